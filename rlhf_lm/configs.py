"""Configuration: one dataclass per stage, parsed from a YAML recipe plus CLI overrides.

Stage configs are built from mixins so every stage reads the same keys the same way:

    @dataclass
    class RewardStageConfig(ModelArguments, DataArguments, trl.RewardConfig): ...

``ModelArguments`` reuses TRL's ``ModelConfig`` (model path, dtype, LoRA fields) with our defaults (LoRA on).
Reading a recipe and flags into one of these is :mod:`rlhf_lm.config_parsing` (re-exported here, where stages and
users import it from).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig

from rlhf_lm.config_parsing import (  # noqa: F401  (re-exported: the public names stages and users import from here)
    KEY_ALIASES,
    check_keys,
    check_value_types,
    closest_key,
    config_from_dict,
    field_names,
    load_recipe,
    parse_config,
)
from rlhf_lm.errors import ConfigError


def finish_config(cfg: Any, trainer_config: type | None = None) -> None:
    """The checks and defaults of every mixin ``cfg`` has, then its trainer config's own ``__post_init__``, in the one
    order they depend on - whatever the order of the stage's bases (TRL's ModelConfig.__post_init__ does not call
    super(), so a cooperative chain through the mixins would stop there).

    ``trainer_config`` is the TRL (or our PPO) config class the stage subclasses; by default the first class in the
    MRO that is a ``TrainingArguments`` and not one of our mixins. Each stage's ``__post_init__`` runs its own checks,
    then this; a mixin used alone (or a config of mixins without a ``__post_init__``) runs this too.
    """
    if isinstance(cfg, ModelArguments):
        check_model_args(cfg)
    if isinstance(cfg, DataArguments):
        check_data_args(cfg)
    if isinstance(cfg, ControllerArguments):
        parse_controller(cfg)
    if isinstance(cfg, TrainingDefaults):
        apply_training_defaults(cfg)  # resolves bf16, which the dtype default below reads
    trainer_config = trainer_config or _trainer_config(type(cfg))
    if trainer_config is not None:
        trainer_config.__post_init__(cfg)
    if isinstance(cfg, ModelArguments) and cfg.dtype is None:
        cfg.dtype = "bfloat16" if cfg.use_peft and getattr(cfg, "bf16", False) else "float32"


def _trainer_config(config_cls: type) -> type | None:
    from transformers import TrainingArguments

    mixins = (ModelArguments, DataArguments, ControllerArguments, TrainingDefaults)
    return next((k for k in config_cls.__mro__ if issubclass(k, TrainingArguments) and not issubclass(k, mixins)),
                None)


@dataclass
class ModelArguments(ModelConfig):
    """Which model to load and how to wrap it with LoRA. Defaults: LoRA on every linear layer."""

    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (default). False = full fine-tune."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout. 0 keeps resume and reference exact."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get LoRA adapters; 'all-linear' = every linear layer but the output head."},
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Weights dtype: auto, bfloat16, float16 or float32. Default: bfloat16 for a frozen LoRA base "
                          "when training in bf16 (half the memory, no per-step casts), float32 otherwise."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to load; defaults to model_name_or_path."}
    )
    allow_pickle_weights: bool = field(
        default=False,
        metadata={"help": "Allow loading pickle (.bin) checkpoints. Off: only safetensors load (pickle can run code)."},
    )

    def __post_init__(self) -> None:
        finish_config(self)


def check_model_args(cfg: ModelArguments) -> None:
    """LoRA settings that cannot work (or would be ignored), then TRL's own ModelConfig checks."""
    if cfg.lora_r <= 0:
        raise ConfigError(f"lora_r must be a positive integer, got {cfg.lora_r}.")
    if not cfg.use_peft:
        changed = [f.name for f in dataclasses.fields(ModelArguments) if f.name in LORA_KEYS
                   and getattr(cfg, f.name) != _default(f)]
        if changed:
            raise ConfigError(f"{', '.join(changed)} set with use_peft: false: a full fine-tune has no LoRA "
                              "adapter, so these keys would be ignored. Remove them, or set use_peft: true.")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}.")
    ModelConfig.__post_init__(cfg)


LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
             "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def overwrite_output_dir_field() -> Any:
    """The ``overwrite_output_dir`` key every stage has (transformers 5 dropped its own)."""
    return field(default=False, metadata={
        "help": "Replace output_dir when it holds a finished run of rlhf-lm (never a folder it did not create). "
                "Also starts over when <output_dir>.partial holds checkpoints of an unfinished run."})


def unread_field(default: Any, why: str) -> Any:
    """A key a stage inherits from a shared base (or from TRL) but does not read. It is not an init field, so a
    recipe or flag cannot set it - check_keys names the key, the stage and ``why`` - while code reading the attribute
    still sees ``default``. Accepting it would let a run silently do something other than what the recipe says."""
    return field(default=default, init=False, metadata={"unread": why})


@dataclass
class DataArguments:
    """Where the training data comes from and how to read it (see ``rlhf_lm.data``)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, or a local .json/.jsonl(.gz)/.parquet/.csv file or directory."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name, if any."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    dataset_eval_split: str | None = field(
        default=None, metadata={"help": "Split used for evaluation; if unset, eval_fraction of the train split."}
    )
    eval_fraction: float | None = field(
        default=None,
        metadata={"help": "Fraction held out for evaluation (by seed) when no eval split is given; default 0.1. Set "
                          "with dataset_eval_split on a single file, it holds out this fraction of the file instead."},
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "Row format: auto, hh_rlhf, explicit, conversational, ultrafeedback, shp."},
    )
    hh_format: str = field(
        default="auto",
        metadata={"help": "HH-RLHF dialogues: 'messages' (Human -> user, Assistant -> assistant turns, through the "
                          "model's chat template), 'text' (raw '\\n\\nHuman: ...' strings), or 'auto' (messages when "
                          "the tokenizer has a chat template)."},
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    chosen_column: str = field(default="chosen", metadata={"help": "Column holding the preferred response."})
    rejected_column: str = field(default="rejected", metadata={"help": "Column holding the dispreferred response."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N eval rows."})

    def __post_init__(self) -> None:
        finish_config(self)


def check_data_args(cfg: DataArguments) -> None:
    if cfg.hh_format not in ("auto", "messages", "text"):
        raise ConfigError(f"hh_format must be auto, messages or text, got '{cfg.hh_format}'.")
    if cfg.eval_fraction is not None and not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}.")


_PROMPTS_ONLY = ("this stage trains on prompts only: it reads prompt_column (and hh_format), never a preference "
                 "format or chosen / rejected columns")


@dataclass
class PromptsOnly:
    """Placed before DataArguments in the bases of a stage that reads prompts, not pairs (ppo, grpo, rloo)."""

    data_format: str = unread_field("prompt_only", _PROMPTS_ONLY)
    chosen_column: str = unread_field("chosen", _PROMPTS_ONLY)
    rejected_column: str = unread_field("rejected", _PROMPTS_ONLY)


_NO_QUANTIZATION = ("this stage loads the policy unquantized (bitsandbytes QLoRA is supported by the reward and dpo "
                    "stages)")


@dataclass
class NoQuantization:
    """Placed before ModelArguments in the bases of a stage that never quantizes its model: TRL's ModelConfig
    quantization keys would otherwise be accepted and the run trained in full precision (ppo, grpo, rloo)."""

    load_in_8bit: bool = unread_field(False, _NO_QUANTIZATION)
    load_in_4bit: bool = unread_field(False, _NO_QUANTIZATION)
    bnb_4bit_quant_type: str = unread_field("nf4", _NO_QUANTIZATION)
    use_bnb_nested_quant: bool = unread_field(False, _NO_QUANTIZATION)
    bnb_4bit_quant_storage: str | None = unread_field(None, _NO_QUANTIZATION)


@dataclass
class TrainingDefaults:
    """Our defaults for TRL/transformers training fields, placed before the TRL config in a stage's bases."""

    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. Default: on when the GPU supports it, off on CPU."},
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in backward to save memory (our memory mode). Off by default: LoRA "
                          "runs that fit go faster without it (checkpointing adds a forward pass: a third more work)."},
    )
    # TRL 1.16 still defaults transformers' deprecated alias to True; unset here, so it neither turns checkpointing on
    # nor warns - a recipe that sets it still works (with transformers' deprecation warning).
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5)."}
    )
    report_to: str | list[str] = field(
        default="none", metadata={"help": "Loggers (tensorboard, wandb, trackio, ...); 'none' logs to console only."}
    )
    overwrite_output_dir: bool = overwrite_output_dir_field()

    def __post_init__(self) -> None:
        finish_config(self)


def apply_training_defaults(cfg: TrainingDefaults) -> None:
    """Our defaults and checks for the training fields, before TRL's / transformers' own ``__post_init__``."""
    from rlhf_lm.redaction import take_hub_token

    take_hub_token(cfg)  # before transformers pickles the config into training_args.bin
    check_batch_sizes(cfg)
    if getattr(cfg, "fp16", False) and (getattr(cfg, "use_cpu", False) or not _has_accelerator()):
        raise ConfigError("fp16: true needs a GPU (fp16 mixed precision does not run on CPU, it would be "
                          "ignored). Remove fp16, or use bf16: true on CPU.")
    if cfg.bf16 is None:
        import torch

        cfg.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if cfg.report_to in (None, [None]):  # TrlParser turns the "none" default of `str | list[str]` into [None]
        cfg.report_to = "none"
    check_tracking_backends(cfg.report_to)


# report_to backends -> the pip package to install (ours where we ship an extra for it)
TRACKING_PACKAGES = {"tensorboard": "rlhf-lm[tracking]", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow",
                     "comet_ml": "comet_ml", "clearml": "clearml", "neptune": "neptune", "swanlab": "swanlab",
                     "dvclive": "dvclive", "codecarbon": "codecarbon", "azure_ml": "azureml-core"}


def check_tracking_backends(report_to: str | list[str]) -> None:
    """Every backend in ``report_to`` is importable, checked before any model loads: transformers would raise deep
    inside trainer construction (``TensorBoardCallback requires tensorboard``) after data and model are loaded."""
    import transformers.integrations.integration_utils as integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        probe = {"azure_ml": "azureml", "comet_ml": "comet"}.get(name, name)  # transformers' is_<probe>_available
        available = getattr(integrations, f"is_{probe}_available", None)
        if name in ("none", "all") or available is None or available():
            continue
        raise ConfigError(f"report_to: {name} needs a package that is not installed: pip install "
                          f"'{TRACKING_PACKAGES.get(name, name)}' (or set report_to: none).")


BATCH_KEYS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")


def check_batch_sizes(cfg: Any, keys: tuple[str, ...] = BATCH_KEYS) -> None:
    """Batch sizes and accumulation steps are positive integers (0 divides by zero deep in a trainer; a negative
    one passes PPO's multiple-of check and trains nothing)."""
    for key in keys:
        value = getattr(cfg, key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}.")


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


@dataclass
class RewardSpecArguments:
    """The reward an online stage (PPO, GRPO, RLOO) trains against, and whether it shares the policy's base."""

    reward_model: str | None = field(
        default=None,
        metadata={"help": "Reward spec: 'gold' (built-in task), a reward-stage output dir, 'pkg.mod:Name' or "
                          "'file.py:Name'."},
    )
    share_reward_base: bool = field(
        default=True,
        metadata={"help": "A reward-stage LoRA reward model trained on the policy's own base checkpoint (same config "
                          "and weights, same tokenizer) is loaded as a second adapter on the policy's base instead "
                          "of a second copy of the weights (needs use_peft). false: always a separate model."},
    )


@dataclass
class PairBatching:
    """Preference-pair stages (reward, DPO): batch pairs of similar length, so less of each batch is padding."""

    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "Batch order: 'group_by_length' (default: random mega-batches of 50 batches, each sorted by "
                          "length; on HH-RLHF it cuts the padded share of DPO batches from 0.60 to 0.14), 'random', "
                          "'sequential' or 'batch_rebalance' (transformers' TrainingArguments)."},
    )


@dataclass
class ControllerArguments:
    """The hyperparameter controller (``rlhf_lm.controller``); off unless the recipe has a ``controller:`` section."""

    controller: dict | str | None = field(
        default=None,
        metadata={"help": "Controller settings: a mapping in the recipe (or a JSON string on the command line), "
                          "e.g. {policy: online, interval: 20}. Unset = no controller."},
    )

    def __post_init__(self) -> None:
        finish_config(self)


def parse_controller(cfg: ControllerArguments) -> None:
    """The ``controller:`` mapping (JSON on the command line), read into a ControllerSpec now, so a bad key or value
    fails naming ``controller.<key>`` before any model loads. The config keeps the keys the recipe set (with the
    values as the spec read them): that is what metrics.json records and what the stage's controller is built from."""
    from rlhf_lm.controller.spec import ControllerSpec

    if isinstance(cfg.controller, str):
        import json

        try:
            cfg.controller = json.loads(cfg.controller)
        except json.JSONDecodeError as e:
            raise ConfigError(f"controller must be a mapping (JSON on the command line): {e}") from e
    if cfg.controller is not None:
        spec = ControllerSpec.from_dict(cfg.controller)
        cfg.controller = {key: getattr(spec, key) for key in cfg.controller}
