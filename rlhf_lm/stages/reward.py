"""Stage ``reward``: train a reward model on preference pairs with TRL's RewardTrainer (LoRA by default).

    rlhf-lm reward --config recipes/builtin/reward.yaml
    accelerate launch -m rlhf_lm reward --config recipes/builtin/reward.yaml --output_dir runs/reward

Loss: Bradley-Terry, ``-log sigmoid(r_chosen - r_rejected - margin)`` (``margin`` when the data has that column),
plus ``center_rewards_coefficient * mean(r^2)`` when set. The backbone is any causal LM or encoder directory: it is
loaded as a one-label sequence classifier, so a policy checkpoint gets a fresh ``score`` head (the usual RM init).

The output directory holds the adapter (or the full / merged model), the tokenizer, and ``metrics.json``: eval
metrics (accuracy, margin, ECE, length bias; gold accuracy on the built-in task), the reward mean/std over the
training responses (``reward_mean`` / ``reward_std`` in its ``run`` entry, for normalising downstream), the data
report and the config.
``rlhf_lm.rewards.ClassifierReward.from_pretrained(output_dir)`` loads it back as a RewardModel.

Engines (docs/distributed.md): one process, DDP and FSDP2 - under FSDP2 every rank gathers the adapter with its
score head for the main process to write, and the closing measurement runs on every rank. Run in 2 CPU processes in
CI (tests/test_distributed.py, tests/test_fsdp.py); DeepSpeed and GPUs: config only, not run. ``merge_adapter`` is
refused under FSDP.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trl import RewardConfig

from rlhf_lm.configs import (
    ControllerArguments,
    DataArguments,
    ModelArguments,
    PairBatching,
    TrainingDefaults,
    finish_config,
    parse_config,
)
from rlhf_lm.controller import attach_controller, build_callback
from rlhf_lm.data.loading import load_preference_data
from rlhf_lm.data.report import DataReport
from rlhf_lm.errors import ConfigError, DataError, EvaluationError, describe
from rlhf_lm.fsdp import fsdp_requested, is_sharded
from rlhf_lm.modeling import (
    check_length_room,
    classifier_head_name,
    count_parameters,
    load_reward_tokenizer,
    load_sequence_classifier,
    lora_config_from_args,
    quantization_kwargs,
    readable_max_length,
)
from rlhf_lm.progress import show_progress, stage_summary
from rlhf_lm.reward_artifact import base_model_relative, measure, save_reward_model
from rlhf_lm.rewards.layout import fit_pairs_to_length
from rlhf_lm.stages.common import (
    check_output_and_resume,
    checkpoints_in,
    config_record,
    require_model,
    staging,
    train_metrics,
    write_stage_metrics,
)
from rlhf_lm.trainers import RewardTrainer

logger = logging.getLogger(__name__)


@dataclass
class RewardStageConfig(ModelArguments, DataArguments, ControllerArguments, PairBatching, TrainingDefaults,
                        RewardConfig):
    """Reward-model training: model + LoRA, data, and TRL's RewardConfig (learning rate, epochs, max_length...)."""

    output_dir: str = field(default="runs/reward", metadata={"help": "Where the reward model artifact is written."})
    length_mode: str = field(
        default="truncate_prompt",
        metadata={"help": "Pairs longer than max_length: 'truncate_prompt' drops a conversation's earliest turns (or "
                          "cuts a text prompt from the left) until they fit, dropping only pairs whose response does "
                          "not fit after the last user turn; 'drop' drops them. Either way they are counted."},
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "Save base + LoRA merged into one model instead of the adapter (bigger, self-contained)."},
    )
    gold_metrics: bool | None = field(
        default=None,
        metadata={"help": "Report accuracy against the built-in task's noise-free gold preference (evaluation only; "
                          "never used in training). Default: on when the data comes from a `rlhf-lm task` dir."},
    )

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ConfigError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}.")
        if self.length_mode not in ("truncate_prompt", "drop"):
            raise ConfigError(f"length_mode must be 'truncate_prompt' or 'drop', got '{self.length_mode}'.")
        if self.merge_adapter and not self.use_peft:
            raise ConfigError("merge_adapter: true needs use_peft: true (a full fine-tune has no adapter to merge).")
        if self.use_liger_kernel:
            # Measured on an H200 (liger-kernel 0.8.5, transformers 5.24): transformers applies Liger's fused
            # LM-head loss to the model, which a sequence classifier does not have, and the first step fails with
            # "'Qwen2ForSequenceClassification' object has no attribute 'lm_head'".
            raise ConfigError("use_liger_kernel: true is not supported by the reward stage: Liger's fused loss "
                              "replaces a causal LM's head, and a reward model (sequence classifier) has none. "
                              "Remove use_liger_kernel from the reward recipe (the DPO stage supports it).")
        finish_config(self, RewardConfig)  # the shared mixins' checks, then TRL's


CONFIG = RewardStageConfig


def run(cfg: RewardStageConfig, callbacks: list | None = None) -> dict[str, float]:
    from accelerate import PartialState
    from transformers import set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    require_model(cfg, "the reward backbone (a causal LM / encoder directory or Hub id)")
    state = PartialState()
    if cfg.merge_adapter and fsdp_requested():
        raise ConfigError("merge_adapter: true is not supported under FSDP: a sharded model cannot be merged in "
                          "place. Remove merge_adapter from the recipe and merge the saved adapter in one process.")
    resume = check_output_and_resume(cfg)
    tokenizer = load_reward_tokenizer(cfg)
    check_length_room(cfg.max_length, tokenizer)
    train, eval_ds, report = load_preference_data(cfg, seed=cfg.seed, tokenizer=tokenizer)
    set_seed(cfg.seed)  # the fresh score head is random: seed it
    with suppress_seqcls_warning():  # "score.weight newly initialised" is the point, not a problem
        model = load_sequence_classifier(cfg.model_name_or_path, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                         allow_pickle_weights=cfg.allow_pickle_weights, sharded_by_trainer=True,
                                         **quantization_kwargs(cfg))
    head = classifier_head_name(model)

    cfg.max_length = readable_max_length(cfg.max_length, model, tokenizer, cfg.model_name_or_path)

    # RewardTrainer silently drops pairs over max_length: fit them here (long prompts keep their last turns), every
    # cut or dropped pair counted, measured in the exact tokens RewardTrainer will see.
    eval_report = DataReport(source=f"{report.source} (eval)", rows_in=len(eval_ds) if eval_ds is not None else 0)
    if cfg.max_length:
        train = fit_pairs_to_length(train, tokenizer, cfg.max_length, report, cfg.length_mode)
        if eval_ds is not None:
            eval_ds = fit_pairs_to_length(eval_ds, tokenizer, cfg.max_length, eval_report, cfg.length_mode)
    logger.info(report.summary())

    peft_config = lora_config_from_args(cfg, task_type="SEQ_CLS", modules_to_save=[head])
    callbacks = list(callbacks or [])
    controller = build_callback(cfg.controller, stage="reward")  # a bad controller: section fails here

    measure_error: Exception | None = None
    with staging(cfg, "reward") as stage:
        with checkpoints_in(cfg, stage):
            trainer = RewardTrainer(model=model, args=cfg, train_dataset=train, eval_dataset=eval_ds,
                                    processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
            attach_controller(trainer, controller)
            show_progress(trainer, "reward")
            for ds, prepared, rep in ((train, trainer.train_dataset, report), (eval_ds, trainer.eval_dataset,
                                                                             eval_report)):
                if ds is not None and len(prepared) < len(ds):  # tokenising prompt+response can differ by a token
                    rep.drop(f"pair over max_length={cfg.max_length} after EOS", len(ds) - len(prepared))
                    rep.rows_out = len(prepared)
            if len(trainer.train_dataset) == 0:
                raise DataError(f"No training pairs fit max_length={cfg.max_length} ({report.summary()}). Raise "
                                "max_length or shorten the data.")
            trainable, total = count_parameters(trainer.model)
            logger.info("Training %s of %s parameters (%s).", f"{trainable:,}", f"{total:,}",
                        "LoRA + head" if peft_config else "full fine-tune")
            result = trainer.train(resume_from_checkpoint=resume)

        metrics = train_metrics(result, trainer, trainable)
        # Under FSDP the model is sharded: saving gathers it and every forward is collective, so every rank takes
        # part in both (the same texts on each, so they stay in step); only the main process writes.
        sharded = is_sharded(trainer.model)
        if state.is_main_process or sharded:
            save_reward_model(cfg, trainer, tokenizer, head, stage, peft_config is not None)
            try:
                measured = measure(cfg, trainer, tokenizer, train, eval_ds)
                metrics.update(measured.pop("metrics"))
            except Exception as e:  # the trained model is saved: keep it, report the failure after
                measure_error, measured = e, {}
                logger.debug("Measuring the reward model failed.", exc_info=True)
        if state.is_main_process:  # measured: the reward mean / std, which ClassifierReward normalises with
            write_stage_metrics(stage, "reward", metrics, config_record(cfg), trainer=trainer, error=measure_error,
                                data={"train": report, "eval": eval_report},
                                run={**measured, "base_model_relative": base_model_relative(cfg, bool(peft_config))})
        state.wait_for_everyone()
    if measure_error is not None:
        raise EvaluationError(f"The reward model was trained and saved to {cfg.output_dir}, but measuring it failed: "
                              f"{describe(measure_error).rstrip('.')}. Its metrics.json lacks the evaluation and "
                              "reward_mean / reward_std; fix the cause and re-run the stage with "
                              "--overwrite_output_dir true.") from measure_error
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(RewardStageConfig, argv)
    metrics = run(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(stage_summary("reward", "reward", metrics, f"written to {cfg.output_dir}"))  # all of them: metrics.json
    return 0
