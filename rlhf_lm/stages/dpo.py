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

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trl
from accelerate import PartialState

from rlhf_lm.builtin_task.task import task_eval_prompts, task_root
from rlhf_lm.configs import (
    ControllerArguments,
    DataArguments,
    ModelArguments,
    PairBatching,
    TrainingDefaults,
    finish_config,
    parse_config,
)
from rlhf_lm.controller import attach_controller, build_callback, controller_metrics
from rlhf_lm.data.loading import hh_as_messages
from rlhf_lm.data.report import DataReport
from rlhf_lm.errors import ConfigError, EvaluationError, describe, suggest
from rlhf_lm.fsdp import full_state_dict, is_sharded
from rlhf_lm.modeling import (
    count_parameters,
    load_causal_lm,
    load_policy_and_reference,
    load_tokenizer,
    quantization_kwargs,
)
from rlhf_lm.preference_pairs import LENGTH_MODES, load_pairs, prepare_pairs, token_cache_dir
from rlhf_lm.progress import show_progress, stage_summary
from rlhf_lm.stages.common import (
    check_output_and_resume,
    checkpoints_in,
    closing_eval_prompts,
    config_record,
    staging,
    train_metrics,
    write_stage_metrics,
)
from rlhf_lm.trainers import DPOTrainer

logger = logging.getLogger(__name__)

# The loss types of TRL 1.16's DPOTrainer (checked against its DPOConfig help in the tests).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOStageConfig(ModelArguments, DataArguments, ControllerArguments, PairBatching, TrainingDefaults,
                     trl.DPOConfig):
    """DPO: model + LoRA, preference data, TRL's DPOConfig (beta, loss_type, max_length, ...) and the final eval."""

    output_dir: str = field(default="runs/dpo", metadata={"help": "Where the DPO policy artifact is written."})
    learning_rate: float = field(
        default=5e-6,
        metadata={"help": "Peak AdamW learning rate. 5e-6 is the alignment-handbook's LoRA DPO value (TRL's 1e-6 "
                          "is for full fine-tunes)."},
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model for a full fine-tune (use_peft: false). Default: the starting model. "
                          "With LoRA the reference is the adapter-free model and this is not needed."},
    )
    sft_adapter_path: str | None = field(
        default=None,
        metadata={"help": "A LoRA adapter (e.g. from SFT) on model_name_or_path to start from. It is trained on, "
                          "and a frozen copy of it - the SFT policy, not the bare base - is the reference."},
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Held-out preference pairs in their own file or dataset (e.g. the task's "
                          "pairs_eval.jsonl). Default: dataset_eval_split, else eval_fraction of the training data."},
    )
    precompute_ref_log_probs: bool | None = field(
        default=None,
        metadata={"help": "Score the reference once over the data before training instead of at every step. Default: "
                          "on when training runs over the data more than once (each later epoch then skips the "
                          "reference forward, a third of a LoRA step's FLOPs), off for a single epoch."},
    )
    length_mode: str = field(
        default="truncate_prompt",
        metadata={"help": "Pairs longer than max_length: 'truncate_prompt' cuts the prompt from the left (the last "
                          "turns stay) to leave room for the longer response, dropping only pairs whose response "
                          "alone fills max_length; 'truncate' cuts the completions (keep_start); 'drop' drops them. "
                          "Every such pair is counted in metrics.json."},
    )
    cache_tokenized: bool = field(
        default=True,
        metadata={"help": "Keep tokenized pairs under $HF_DATASETS_CACHE/rlhf_lm, keyed by a hash of the data and the "
                          "tokenizer, so reruns on the same data skip tokenization."},
    )
    eval_prompts: str | None = field(
        default=None,
        metadata={"help": "Held-out prompts to sample policy and reference on after training (a prompt file or "
                          "dataset). Default: the built-in task's prompts_eval.jsonl when the data comes from a task "
                          "dir, else the prompts of the held-out pairs that no training pair has."},
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "Judge of the policy-vs-reference win-rate: 'gold', a reward-stage dir, 'pkg.mod:Name' or "
                          "'file.py:Name'. Unset: no reward-judged win-rate (gold still reported on the task)."},
    )
    eval_gold: bool | None = field(
        default=None,
        metadata={"help": "Report the built-in task's gold reward and gold-judged win-rate (evaluation only). "
                          "Default: on when the data comes from a `rlhf-lm task` dir."},
    )
    eval_num_prompts: int | None = field(default=None, metadata={"help": "Use only the first N eval prompts."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Tokens to sample per eval completion."})
    eval_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the eval (0 = greedy)."})

    def __post_init__(self) -> None:
        check_dpo_args(self)
        finish_config(self, trl.DPOConfig)  # the shared mixins' checks, then TRL's


CONFIG = DPOStageConfig


def check_dpo_args(cfg: DPOStageConfig) -> None:
    """The mistakes TRL would report late, deep in a stack trace, or not at all."""
    if isinstance(cfg.loss_type, str):
        cfg.loss_type = [t.strip() for t in cfg.loss_type.split(",") if t.strip()]
    if cfg.beta <= 0:
        raise ConfigError(f"beta must be > 0 (it scales the implicit reward; the DPO paper uses 0.1), got {cfg.beta}.")
    if not cfg.loss_type:
        raise ConfigError(f"loss_type is empty; choose from {', '.join(LOSS_TYPES)}.")
    for loss in cfg.loss_type:
        if loss not in LOSS_TYPES:
            raise ConfigError(f"Unknown loss_type '{loss}'.{suggest(loss, LOSS_TYPES)} Choose from "
                              f"{', '.join(LOSS_TYPES)}.")
    if cfg.loss_weights is not None:
        if len(cfg.loss_weights) != len(cfg.loss_type):
            raise ConfigError(f"loss_weights has {len(cfg.loss_weights)} entries for {len(cfg.loss_type)} loss types "
                              f"{cfg.loss_type}; give one weight per loss type.")
        if any(w < 0 for w in cfg.loss_weights):
            raise ConfigError(f"loss_weights must be >= 0, got {cfg.loss_weights}.")
    if "exo_pair" in cfg.loss_type and cfg.label_smoothing <= 0:
        raise ConfigError("loss_type 'exo_pair' needs label_smoothing > 0 (the EXO paper uses 1e-3).")
    if "robust" in cfg.loss_type and not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"loss_type 'robust' needs label_smoothing in [0, 0.5) (the flip rate), got "
                          f"{cfg.label_smoothing}.")
    if cfg.length_mode not in LENGTH_MODES:
        raise ConfigError(f"length_mode must be one of {', '.join(LENGTH_MODES)}, got '{cfg.length_mode}'.")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise ConfigError(f"max_length must be at least 2 tokens (or null for no limit), got {cfg.max_length}.")
    if cfg.sft_adapter_path and not cfg.use_peft:
        raise ConfigError("sft_adapter_path needs use_peft: true (the SFT adapter is what DPO trains on).")
    if cfg.sft_adapter_path and cfg.ref_model_name_or_path:
        raise ConfigError("Set either sft_adapter_path (reference = the SFT adapter) or ref_model_name_or_path, "
                          "not both.")
    if cfg.sync_ref_model and cfg.use_peft:
        raise ConfigError("sync_ref_model (TR-DPO) needs a separate reference model: set use_peft: false.")
    if cfg.eval_num_prompts is not None and cfg.eval_num_prompts <= 0:
        raise ConfigError(f"eval_num_prompts must be positive, got {cfg.eval_num_prompts}.")
    if not cfg.use_peft and cfg.dtype in ("bfloat16", "float16") and not (cfg.deepspeed or cfg.fsdp):
        # AdamW then updates bf16 weights in place: at a full fine-tune's learning rates (~5e-7) most updates are
        # below bf16's resolution and round away (measured: 99.7% of the elements of SmolLM2 unchanged by a step).
        logger.warning("A full fine-tune with dtype: %s and no DeepSpeed/FSDP keeps no float32 master weights, so "
                       "small updates round away. Load float32 weights (dtype: float32) with bf16: true for mixed "
                       "precision, or launch with a DeepSpeed/FSDP config.", cfg.dtype)


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
            write_metrics(cfg, stage, metrics, report, eval_report, eval_error, controller_metrics(trainer))
        state.wait_for_everyone()
    if eval_error is not None:
        raise EvaluationError(f"The DPO policy was trained and saved to {cfg.output_dir}, but the closing evaluation "
                              f"failed: {describe(eval_error).rstrip('.')}. Re-run only the evaluation with: "
                              f"{evaluate_command(cfg)}") from eval_error
    return metrics


def load_judge(cfg: DPOStageConfig) -> tuple[Any, list[Any] | None]:
    """(reward model, held-out prompts): the reward model that judges the win-rate, resolved and called once on the
    held-out prompts before training; (None, None) without one (the prompts are then loaded for the evaluation)."""
    if not cfg.reward_model:
        return None, None
    from rlhf_lm.rewards import load_reward, probe_reward

    reward = load_reward(cfg.reward_model)
    require_model(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, padding_side="right",
                               trust_remote_code=cfg.trust_remote_code, require_eos=True)  # decides hh_format: auto
    prompts = load_eval_prompts(cfg, tokenizer)
    if not prompts:
        logger.warning("reward_model %s is set, but there are no held-out prompts to judge the policy on (set "
                       "eval_prompts): it will not be used.", cfg.reward_model)
        return None, prompts
    probe_reward(reward, prompts, name=cfg.reward_model)
    return reward, prompts


def load_eval_prompts(cfg: DPOStageConfig, tokenizer=None) -> list[Any]:
    """Held-out prompts for the generation eval: ``eval_prompts``, else the built-in task's, else the prompts of the
    held-out pairs that no training pair has."""
    from rlhf_lm.data.loading import unseen_prompts

    def unseen_held_out_prompts() -> list[Any]:
        train, held_out, _, _ = load_pairs(cfg, tokenizer)
        return unseen_prompts(held_out, train)

    return closing_eval_prompts(cfg.eval_prompts, "train", cfg.prompt_column, hh_as_messages(cfg, tokenizer),
                                cfg.dataset_name, unseen_held_out_prompts, cfg.eval_num_prompts)[0]


def build_trainer(cfg: DPOStageConfig, callbacks: list | None = None):
    """Load data and model and build the DPOTrainer; returns ``(trainer, tokenizer, (train_report, eval_report))``."""
    require_model(cfg)
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
        cfg.precompute_ref_log_probs = passes_over_data(cfg, len(train_tok)) > 1 and not cfg.sync_ref_model
    policy, ref_model, peft_config = load_policy_and_reference(cfg)
    callbacks = list(callbacks or [])
    controller = build_callback(cfg.controller, stage="dpo")  # a bad controller: section fails here
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=cfg, train_dataset=train_tok, eval_dataset=eval_tok,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    attach_controller(trainer, controller)
    show_progress(trainer, "dpo")
    return trainer, tokenizer, (report, eval_report)


def require_model(cfg: DPOStageConfig) -> None:
    if not cfg.model_name_or_path:
        raise ConfigError("Set model_name_or_path: the policy to fine-tune (a causal LM directory or Hub id).")


def passes_over_data(cfg: DPOStageConfig, num_pairs: int) -> float:
    """How many times training visits each pair: num_train_epochs, or what max_steps amounts to."""
    if cfg.max_steps <= 0:
        return float(cfg.num_train_epochs)
    pairs_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * PartialState().num_processes
    return cfg.max_steps / math.ceil(num_pairs / pairs_per_step)


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


def evaluate_against_reference(cfg: DPOStageConfig, trainer, tokenizer, stage: Path, prompts: list[Any] | None = None,
                               reward=None) -> dict[str, float]:
    """Sample the policy and its reference on held-out prompts (win-rate, reward, KL, gold) into samples.jsonl."""
    from rlhf_lm.evaluation import evaluate_policy

    prompts = load_eval_prompts(cfg, tokenizer) if prompts is None else prompts
    if not prompts:
        return {}
    policy = trainer.accelerator.unwrap_model(trainer.model)
    reference = None
    if not cfg.use_peft:  # a full fine-tune needs its reference model back (it may have been freed or never loaded)
        reference = trainer.ref_model or load_causal_lm(cfg.ref_model_name_or_path or cfg.model_name_or_path,
                                                         dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                                         allow_pickle_weights=cfg.allow_pickle_weights)
        reference = trainer.accelerator.unwrap_model(reference)
        if not is_sharded(reference):  # TRL shards a reference it keeps under FSDP: it stays where it is
            reference = reference.to(trainer.args.device)
    gold = cfg.eval_gold if cfg.eval_gold is not None else task_root(cfg.dataset_name) is not None
    metrics = evaluate_policy(policy, tokenizer, prompts, reward, reference=reference, gold=gold,
                              samples_path=stage / "samples.jsonl" if trainer.accelerator.is_main_process else None,
                              max_new_tokens=cfg.eval_max_new_tokens,
                              temperature=cfg.eval_temperature, seed=cfg.seed,
                              batch_size=max(cfg.per_device_eval_batch_size, 64))
    logger.info("DPO policy vs reference: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def write_metrics(cfg: DPOStageConfig, stage: Path, metrics: dict[str, float], report: DataReport,
                  eval_report: DataReport, eval_error: Exception | None = None,
                  controller: dict[str, Any] | None = None) -> None:
    """metrics.json, written last: it marks the stage finished (for a pipeline), with the evaluation's failure if any."""
    reference = ("sft_adapter" if cfg.sft_adapter_path else "base (adapters off)" if cfg.use_peft
                 else "ref_model")
    write_stage_metrics(stage, metrics, (report, eval_report), json.loads(json.dumps(config_record(cfg), default=str)),
                        eval_error, reference=reference, **(controller or {}))


def evaluate_command(cfg: DPOStageConfig) -> str:
    """The `rlhf-lm evaluate` command that re-runs this stage's closing evaluation on its saved output."""
    parts = ["rlhf-lm evaluate", f"--policy_path {cfg.output_dir}", f"--output_dir {cfg.output_dir}-eval"]
    prompts = cfg.eval_prompts or task_eval_prompts(cfg.dataset_name)
    if prompts:
        parts.append(f"--prompts {prompts}")
    if cfg.reward_model:
        parts.append(f"--reward_model {cfg.reward_model}")
    if cfg.eval_dataset_name:
        parts.append(f"--pairs {cfg.eval_dataset_name} --beta {cfg.beta}")
    if cfg.eval_num_prompts:
        parts.append(f"--num_prompts {cfg.eval_num_prompts}")
    if cfg.eval_gold is not None:
        parts.append(f"--gold {str(cfg.eval_gold).lower()}")
    parts.append(f"--max_new_tokens {cfg.eval_max_new_tokens} --temperature {cfg.eval_temperature} --seed {cfg.seed}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(DPOStageConfig, argv)
    metrics = run(cfg)
    print(stage_summary("dpo", "dpo", metrics, f"written to {cfg.output_dir}"))  # all of them: metrics.json
    return 0
