"""Stage ``ppo``: fine-tune a policy with PPO - LoRA policy + value head on one frozen base, reference = adapters off,
and a reward-stage LoRA reward model trained on that base as a second adapter on it (``share_reward_base``).

    rlhf-lm ppo --config recipes/builtin/ppo.yaml --reward_model runs/reward [--key value ...]
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m rlhf_lm ppo --config ...

Writes to ``output_dir``: the LoRA adapter (``adapter_model.safetensors``), the value head, the tokenizer and
``metrics.json`` (final metrics, data report, config, log history). Interrupted runs resume with
``--resume_from_checkpoint true`` (the newest complete checkpoint of ``<output_dir>.partial``) or a checkpoint path.

Engines (docs/distributed.md): one process, DDP and FSDP2 - under FSDP2 the loop shards policy and value head itself
(:mod:`rlhf_lm.ppo.sharding`), rollouts generate from the shards, checkpoints hold sharded or gathered state per
``fsdp_state_dict_type``. Run in 2 CPU processes in CI (tests/test_distributed.py, tests/test_fsdp.py); GPUs: not
run. DeepSpeed: never run; ZeRO-3 would need the weights gathered around generation, which this loop does not do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from rlhf_lm.artifacts import METRICS_FILE, staged_output
from rlhf_lm.configs import (
    ControllerArguments,
    DataArguments,
    ModelArguments,
    NoQuantization,
    PromptsOnly,
    RewardSpecArguments,
    TrainingDefaults,
    finish_config,
    parse_config,
)
from rlhf_lm.controller import attach_controller, build_callback, controller_metrics
from rlhf_lm.errors import ConfigError
from rlhf_lm.fsdp import state_bytes_per_rank
from rlhf_lm.json_files import write_json
from rlhf_lm.ppo import PPOConfig, PPOTrainer
from rlhf_lm.progress import show_progress, stage_summary
from rlhf_lm.stages.common import checkpoints_in, prepare_online_run

logger = logging.getLogger(__name__)


@dataclass
class PPOStageConfig(RewardSpecArguments, NoQuantization, ModelArguments, PromptsOnly, DataArguments, ControllerArguments,
                     TrainingDefaults, PPOConfig):
    """Everything the ``ppo`` stage reads: model + LoRA, prompt data, reward spec, PPO and training settings."""

    output_dir: str = field(default="runs/ppo", metadata={"help": "Where the adapter, value head and metrics go."})
    logging_steps: float = field(default=5, metadata={"help": "Log every N PPO iterations."})
    save_strategy: str = field(default="no", metadata={"help": "'steps' saves a resumable checkpoint every "
                                                                 "save_steps iterations; 'no' saves only the result."})

    def __post_init__(self) -> None:
        if not self.use_peft:
            raise ConfigError("PPO here trains a LoRA adapter and uses the adapter-free base as the reference (one "
                              "copy of the weights); use_peft: false is not supported.")
        finish_config(self, PPOConfig)  # the shared mixins' checks, then PPOConfig's (and transformers')


CONFIG = PPOStageConfig


def run(cfg: PPOStageConfig, callbacks: list | None = None) -> dict[str, float]:
    from peft import get_peft_model
    from transformers import set_seed

    from rlhf_lm.modeling import load_causal_lm, lora_config_from_args

    resume, place_reward, tokenizer, train, eval_ds, report = prepare_online_run(cfg)
    set_seed(cfg.seed)  # before LoRA's random init, so a run is a function of its config
    model = load_causal_lm(cfg.model_name_or_path, dtype=cfg.dtype or "auto", trust_remote_code=getattr(cfg, "trust_remote_code", False),
                           allow_pickle_weights=cfg.allow_pickle_weights)
    model = get_peft_model(model, lora_config_from_args(cfg))
    # A reward-stage adapter trained on the same base goes onto the policy's weights (one base copy of the weights).
    reward, reward_layout = place_reward(model, tokenizer)
    callbacks = list(callbacks or [])  # our trainer sends transformers' TrainerCallback events, as TRL's do
    controller = build_callback(cfg.controller, stage="ppo")  # a bad controller: section fails here

    with staged_output(cfg.output_dir, stage="ppo", overwrite=cfg.overwrite_output_dir,
                       resume=cfg.resume_from_checkpoint) as out:
        with checkpoints_in(cfg, out):  # checkpoints go to the partial dir until the run succeeds
            trainer = PPOTrainer(model, cfg, tokenizer, reward, train["prompt"],
                                 eval_prompts=eval_ds["prompt"] if eval_ds is not None else None,
                                 callbacks=callbacks, data_report=report)
            attach_controller(trainer, controller)
            show_progress(trainer, "ppo")
            logger.info(trainer.data_report.summary())
            start = time.perf_counter()
            final = trainer.train(resume_from_checkpoint=resume)
            final["train_runtime"] = time.perf_counter() - start
            trainer.save_model(out)
            memory = state_bytes_per_rank(trainer.unwrapped, trainer.optimizer)
        if trainer.accelerator.is_main_process:
            write_json(out / METRICS_FILE, {
                **final,
                "num_processes": trainer.accelerator.num_processes,
                "distributed_type": str(trainer.accelerator.distributed_type),
                **memory,
                "episodes": trainer.counters["episodes"],
                "missing_eos": trainer.counters["missing_eos"],
                "data_report": trainer.data_report.as_dict(),
                "reward_layout": reward_layout,
                "log_history": trainer.state.log_history,
                "config": cfg.to_dict(),
                **controller_metrics(trainer),
            })
    return final


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(PPOStageConfig, argv)
    print(stage_summary("ppo", "ppo", run(cfg), f"written to {cfg.output_dir}"))
    return 0
