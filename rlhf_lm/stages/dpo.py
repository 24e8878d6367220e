"""Stage ``dpo``: Direct Preference Optimization with TRL's DPOTrainer (LoRA by default).

    rlhf-lm dpo --config recipes/builtin/dpo.yaml
    accelerate launch -m rlhf_lm dpo --config recipes/builtin/dpo.yaml --output_dir runs/dpo

The reference policy is never a second copy of the model when LoRA is on:

* a fresh LoRA adapter: the reference is the same model with its adapters switched off (the base);
* ``sft_adapter_path``: the SFT adapter is loaded and trained on, and TRL keeps a frozen copy of it named ``"ref"``
  as the reference - so the reference is the SFT policy, not the bare base it was trained from;
* a full fine-tune (``use_peft: false``): an explicit reference model, ``ref_model_name_or_path`` (default: the
  starting model), unless its log-probs are computed once before training (``precompute_ref_log_probs``: on by
  default when training runs more than one epoch, with LoRA too - later epochs then skip the reference forward).

Pairs are tokenized once, in batches over whole columns, before TRL sees them (:mod:`rlhf_lm.preference_pairs`);
the lengths that come out of it decide, visibly and counted, which pairs are dropped or truncated at ``max_length``.
At the end the policy is evaluated against its reference: TRL's implicit-reward accuracy and margin on the held-out
pairs, and - on held-out prompts - win-rate, reward, KL and samples (:mod:`rlhf_lm.evaluation`).

The output directory holds the adapter (or the full model), the tokenizer, ``samples.jsonl`` and ``metrics.json``.

Engines (docs/distributed.md): one process, DDP and FSDP2, LoRA and full fine-tune - under FSDP2 the artifact is
gathered from the shards and the closing evaluation samples on every rank in step. Run in 2 CPU processes in CI
(tests/test_distributed.py, tests/test_fsdp.py); DeepSpeed and GPUs: config only, not run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import trl
from accelerate import PartialState

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
from rlhf_lm.dpo.config import DPOArguments, check_dpo_args, precompute_by_default
from rlhf_lm.dpo.evaluation import MODEL_HELP, evaluate_against_reference, evaluate_command, load_judge, reference_kind
from rlhf_lm.errors import ConfigError, EvaluationError, describe
from rlhf_lm.fsdp import full_state_dict, is_sharded
from rlhf_lm.modeling import count_parameters, load_policy_and_reference, load_tokenizer, quantization_kwargs
from rlhf_lm.preference_pairs import load_pairs, prepare_pairs, token_cache_dir
from rlhf_lm.progress import show_progress, stage_summary
from rlhf_lm.stages.common import (
    check_output_and_resume,
    checkpoints_in,
    config_record,
    require_model,
    staging,
    train_metrics,
    write_stage_metrics,
)
from rlhf_lm.trainers import DPOTrainer

logger = logging.getLogger(__name__)


@dataclass
class DPOStageConfig(DPOArguments, ModelArguments, DataArguments, ControllerArguments, PairBatching, TrainingDefaults,
                     trl.DPOConfig):
    """DPO: model + LoRA, preference data, TRL's DPOConfig (beta, loss_type, max_length, ...), the reference and the
    closing evaluation (:class:`rlhf_lm.dpo.config.DPOArguments`)."""

    output_dir: str = field(default="runs/dpo", metadata={"help": "Where the DPO policy artifact is written."})

    def __post_init__(self) -> None:
        check_dpo_args(self)
        finish_config(self, trl.DPOConfig)  # the shared mixins' checks, then TRL's


CONFIG = DPOStageConfig


def run(cfg: DPOStageConfig, callbacks: list | None = None) -> dict[str, float]:
    """Train, save, then evaluate against the reference; the artifact goes to ``cfg.output_dir``.

    Everything that can be checked without the model is checked first: the output directory, the checkpoint to
    resume from, and the judging reward model (resolved and called once). The trained policy is saved before the
    closing evaluation, so an evaluation failure leaves it in place (and says how to re-run only the evaluation).
    """
    state = PartialState()
    resume = check_output_and_resume(cfg)
    judge, prompts = load_judge(cfg)
    eval_error: Exception | None = None
    with staging(cfg, "dpo") as stage:
        with checkpoints_in(cfg, stage):
            trainer, tokenizer, (report, eval_report) = build_trainer(cfg, callbacks)
            trainable, total = count_parameters(trainer.model)
            logger.info("Training %s of %s parameters (%s).", f"{trainable:,}", f"{total:,}",
                        "LoRA" if cfg.use_peft else "full fine-tune")
            result = trainer.train(resume_from_checkpoint=resume)
        metrics = train_metrics(result, trainer, trainable, steps=True)
        # Under FSDP the policy is sharded: saving gathers it and every forward (generation included) is collective,
        # so every rank takes part in both, on the same prompts with the same seed; only the main process writes.
        every_rank = is_sharded(trainer.model)
        if state.is_main_process or every_rank:
            save_artifact(cfg, trainer, tokenizer, stage)
        try:
            if trainer.eval_dataset is not None:
                from rlhf_lm.evaluation import preference_accuracy

                metrics.update(preference_accuracy(trainer))  # collective under DDP: every rank takes part
            if state.is_main_process or every_rank:
                metrics.update(evaluate_against_reference(cfg, trainer, tokenizer, stage, prompts, judge))
        except Exception as e:  # the trained policy is saved: keep it, report the evaluation's failure after
            eval_error = e
            logger.debug("The closing evaluation failed.", exc_info=True)
        if state.is_main_process:
            write_stage_metrics(stage, "dpo", metrics, config_record(cfg), trainer=trainer, error=eval_error,
                                data={"train": report, "eval": eval_report}, run={"reference": reference_kind(cfg)})
        state.wait_for_everyone()
    if eval_error is not None:
        raise EvaluationError(f"The DPO policy was trained and saved to {cfg.output_dir}, but the closing evaluation "
                              f"failed: {describe(eval_error).rstrip('.')}. Re-run only the evaluation with: "
                              f"{evaluate_command(cfg)}") from eval_error
    return metrics


def build_trainer(cfg: DPOStageConfig, callbacks: list | None = None):
    """Load data and model and build the DPOTrainer; returns ``(trainer, tokenizer, (train_report, eval_report))``."""
    require_model(cfg, MODEL_HELP)
    quantization_kwargs(cfg)  # a QLoRA run that cannot work here fails now, not after loading and tokenizing data
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, padding_side="right",
                               trust_remote_code=cfg.trust_remote_code, require_eos=True)
    train, eval_ds, report, eval_report = load_pairs(cfg, tokenizer)
    with PartialState().main_process_first():  # rank 0 writes the token cache, the others then read it
        cache = token_cache_dir(cfg.cache_tokenized)
        train_tok = prepare_pairs(train, tokenizer, cfg, report, "training", cache)
        eval_tok = prepare_pairs(eval_ds, tokenizer, cfg, eval_report, "eval", cache) if eval_ds is not None else None
    logger.info(report.summary())
    if eval_ds is not None:
        logger.info(eval_report.summary())
    if eval_tok is None and cfg.eval_strategy != "no":
        raise ConfigError(f"eval_strategy={cfg.eval_strategy} needs held-out pairs; there are none.")

    if cfg.precompute_ref_log_probs is None:
        cfg.precompute_ref_log_probs = precompute_by_default(cfg, len(train_tok))
    policy, ref_model, peft_config = load_policy_and_reference(cfg)
    callbacks = list(callbacks or [])
    controller = build_callback(cfg.controller, stage="dpo")  # a bad controller: section fails here
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=cfg, train_dataset=train_tok, eval_dataset=eval_tok,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    attach_controller(trainer, controller)
    show_progress(trainer, "dpo")
    return trainer, tokenizer, (report, eval_report)


def save_artifact(cfg: DPOStageConfig, trainer, tokenizer, stage: Path) -> None:
    """The trained policy (adapter or full model) and its tokenizer. Called by every rank when the policy is
    sharded (gathering it is collective); only the main process writes."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    state_dict = full_state_dict(model) if is_sharded(model) else None
    if not trainer.accelerator.is_main_process:
        return
    if cfg.use_peft:  # only the trained adapter, not TRL's "ref" copy of an SFT adapter
        model.save_pretrained(stage, selected_adapters=["default"], safe_serialization=True, state_dict=state_dict)
    elif state_dict is not None:
        model.save_pretrained(stage, state_dict=state_dict, safe_serialization=True)
    else:
        trainer.save_model(str(stage))
    tokenizer.save_pretrained(stage)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DPOStageConfig, argv)
    metrics = run(cfg)
    print(stage_summary("dpo", "dpo", metrics, f"written to {cfg.output_dir}"))  # all of them: metrics.json
    return 0
