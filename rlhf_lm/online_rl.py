"""What the ``grpo`` and ``rloo`` stages share: TRL's online-RL trainers (GRPOTrainer, RLOOTrainer) run on our
reward specs and data, and saved as a stage's artifact.

TRL does the algorithm; this adds what it lacks for our recipes: the same reward specs as PPO (``gold``, a
reward-stage directory, ``pkg.mod:Name``, ``file.py:Name``) wrapped as TRL reward functions with a NaN / shape check
that names the reward, counted prompt-length filtering, and the stage contract (adapter + tokenizer + metrics.json
in ``output_dir``, written via ``staged_output``). Each stage module holds only its config and picks the trainer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import ClassVar

from rlhf_lm.artifacts import staged_output
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
from rlhf_lm.controller import attach_controller, build_callback
from rlhf_lm.errors import DataError
from rlhf_lm.fsdp import full_state_dict, is_sharded
from rlhf_lm.progress import show_progress, stage_summary
from rlhf_lm.rewards.trl_adapter import TRLRewardFunction
from rlhf_lm.sampling import NEUTRAL_SAMPLING, prompt_text
from rlhf_lm.stages.common import checkpoints_in, config_record, prepare_online_run, write_stage_metrics
from rlhf_lm.trainers import with_atomic_checkpoints

logger = logging.getLogger(__name__)


def without_config_fields(options: dict, cfg) -> dict:
    """``options`` minus those the trainer's config sets itself (TRL reads top_k, top_p, ... from its own fields)."""
    return {k: v for k, v in options.items() if not hasattr(cfg, k) or getattr(cfg, k) is None}


def reward_name(spec: str) -> str:
    return spec.rstrip("/").rpartition("/")[-1].replace(":", ".") or "reward"


def filter_prompts(ds, tokenizer, max_prompt_length: int | None, report):
    """Drop (and count) prompts longer than ``max_prompt_length`` tokens; TRL would truncate them silently."""
    if not max_prompt_length:
        return ds

    def length(prompt) -> int:
        return len(tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"])

    keep = [i for i, p in enumerate(ds["prompt"]) if length(p) <= max_prompt_length]
    if len(keep) < len(ds):
        report.drop(f"prompt over max_prompt_length={max_prompt_length} tokens", len(ds) - len(keep))
        report.rows_out = len(keep)
    if not keep:
        raise DataError(f"No prompts of at most max_prompt_length={max_prompt_length} tokens ({report.summary()}).")
    return ds.select(keep)


@dataclass
class OnlineRLArguments(RewardSpecArguments, NoQuantization, ModelArguments, PromptsOnly, DataArguments,
                        ControllerArguments, TrainingDefaults):
    """Everything the ``grpo`` and ``rloo`` configs read besides TRL's own config, which each lists after this one:
    model + LoRA, prompt data, a reward spec, the controller, and counted prompt-length filtering."""

    TRL_CONFIG: ClassVar[type]  # GRPOConfig / RLOOConfig, whose checks run after the shared mixins'

    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Prompts with more tokens are dropped (and counted). None = keep all."})

    def __post_init__(self) -> None:
        finish_config(self, self.TRL_CONFIG)


def online_main(config_cls: type, run, stage: str, argv: list[str] | None) -> int:
    """A ``grpo`` / ``rloo`` command: parse ``config_cls``, train with ``run``, print the summary line."""
    cfg = parse_config(config_cls, argv)
    print(stage_summary(stage, stage, run(cfg), f"written to {cfg.output_dir}"))
    return 0


def run_online(cfg, trainer_cls, stage: str, callbacks: list | None = None) -> dict[str, float]:
    """Load model, tokenizer, prompts and reward; train with ``trainer_cls`` (GRPOTrainer / RLOOTrainer); save."""
    from peft import get_peft_model
    from transformers import set_seed

    from rlhf_lm.modeling import load_causal_lm, lora_config_from_args
    from rlhf_lm.shared_reward import PolicyAdapterOnlySaves

    resume, place_reward, tokenizer, train, eval_ds, report = prepare_online_run(cfg)
    train = filter_prompts(train, tokenizer, cfg.max_prompt_length, report)
    if eval_ds is not None:
        eval_ds = filter_prompts(eval_ds, tokenizer, cfg.max_prompt_length, report)
    logger.info(report.summary())
    set_seed(cfg.seed)  # before LoRA's random init, so a run is a function of its config
    model = load_causal_lm(cfg.model_name_or_path, dtype=cfg.dtype or "auto", trust_remote_code=getattr(cfg, "trust_remote_code", False),
                           allow_pickle_weights=cfg.allow_pickle_weights, sharded_by_trainer=True)
    peft_config = lora_config_from_args(cfg)
    if peft_config is not None:
        # Wrapped here rather than via peft_config=: TRL then sees a PeftModel and, with beta > 0, uses the
        # adapter-free base as its reference (no second copy of the weights).
        model = get_peft_model(model, peft_config)
    # A reward-stage adapter trained on the same base goes onto the policy's weights (one base copy of the weights).
    reward, reward_layout = place_reward(model, tokenizer)
    reward_fn = TRLRewardFunction(reward, reward_name(cfg.reward_model))
    callbacks = list(callbacks or [])
    controller = build_callback(cfg.controller, stage=stage)  # a bad controller: section fails here

    # TRL sets temperature, top_k, top_p, min_p and repetition_penalty from the config, but min_p's default (None)
    # and every option it does not set are filled from the checkpoint's generation_config: pin them to neutral, as
    # our PPO does, so samples come from the softmax the loss is computed on. The recipe's own choices win.
    cfg.generation_kwargs = {**without_config_fields(NEUTRAL_SAMPLING, cfg), **(cfg.generation_kwargs or {})}
    # Checkpoints are written atomically, and no save writes a shared reward adapter as if it had been trained here.
    trainer_cls = with_atomic_checkpoints(type(trainer_cls.__name__, (PolicyAdapterOnlySaves, trainer_cls), {}))
    with staged_output(cfg.output_dir, stage=stage, overwrite=cfg.overwrite_output_dir,
                       resume=cfg.resume_from_checkpoint) as out:
        with checkpoints_in(cfg, out):
            trainer = trainer_cls(model=model, reward_funcs=[reward_fn], args=cfg, train_dataset=train,
                                  eval_dataset=eval_ds if cfg.eval_strategy != "no" else None,
                                  processing_class=tokenizer, callbacks=callbacks)
            attach_controller(trainer, controller)
            show_progress(trainer, stage)
            start = time.perf_counter()
            result = trainer.train(resume_from_checkpoint=resume or None)
            runtime = time.perf_counter() - start
            save_policy(trainer, out)
        train_logs = [h for h in trainer.state.log_history if f"rewards/{reward_fn.__name__}/mean" in h]
        metrics = {"train/loss": result.training_loss, "train/runtime_s": runtime}
        if train_logs:
            metrics["reward/first"] = train_logs[0]["reward"]
            metrics["reward/last"] = train_logs[-1]["reward"]
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(out)
            write_stage_metrics(out, stage, metrics, config_record(cfg), trainer=trainer, data={"train": report},
                                run={"reward_layout": reward_layout})
    return metrics


def save_policy(trainer, out) -> None:
    """The trained adapter (or full model). Under FSDP every rank gathers it and the main process writes it whatever
    the launch's fsdp_state_dict_type (transformers' save_model writes nothing for SHARDED_STATE_DICT)."""
    if not is_sharded(trainer.model):
        trainer.save_model(str(out))
        return
    state_dict = full_state_dict(trainer.model)
    if trainer.accelerator.is_main_process:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(out, state_dict=state_dict,
                                                                          safe_serialization=True)
