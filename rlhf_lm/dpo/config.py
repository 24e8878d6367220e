"""What the DPO stage adds to TRL's DPOConfig: its keys (the reference, the length limit, the token cache, the
closing evaluation), the checks that catch a wrong combination before anything loads, and the defaults that depend on
the data.

The stage's config (:class:`rlhf_lm.stages.dpo.DPOStageConfig`) is these keys, the shared mixins and TRL's DPOConfig.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from accelerate import PartialState

from rlhf_lm.errors import ConfigError, suggest
from rlhf_lm.preference_pairs import LENGTH_MODES

logger = logging.getLogger(__name__)

# The loss types of TRL 1.16's DPOTrainer (checked against its DPOConfig help in the tests).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOArguments:
    """The DPO stage's own keys, beside TRL's DPOConfig (beta, loss_type, max_length, ...): the reference, the
    length limit, the token cache and the closing evaluation."""

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


def check_dpo_args(cfg) -> None:
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


def passes_over_data(cfg, num_pairs: int) -> float:
    """How many times training visits each pair: num_train_epochs, or what max_steps amounts to."""
    if cfg.max_steps <= 0:
        return float(cfg.num_train_epochs)
    pairs_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * PartialState().num_processes
    return cfg.max_steps / math.ceil(num_pairs / pairs_per_step)


def precompute_by_default(cfg, num_pairs: int) -> bool:
    """``precompute_ref_log_probs`` when the recipe leaves it unset: on when training visits each pair more than once
    (later visits then skip the reference forward), and never with a reference that is synced during training."""
    return passes_over_data(cfg, num_pairs) > 1 and not cfg.sync_ref_model
