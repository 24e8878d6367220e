"""Loading policy / reward backbones and tokenizers, LoRA configs, and the offline tiny-model factory.

The stages load through here: DPO's policy with its reference (:func:`load_policy_and_reference`), the reward
stage's tokenizer and classification head (:func:`load_reward_tokenizer`, :func:`classifier_head_name`).

The factory builds random-init Llama/Qwen2-shaped causal LMs, their sequence-classification twins and a BERT-style
encoder, with a BPE tokenizer trained locally, and saves them with ``save_pretrained`` so every stage loads them
exactly as it would load a Hub model. Nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from rlhf_lm.errors import ArtifactError, ConfigError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# A plain "role: text" template: enough for conversational data on the tiny models, and easy to read in samples.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

TINY_DEFAULTS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


# --------------------------------------------------------------------------------------------------- tokenizers
def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, encoder: bool = False) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer on ``texts``.

    Decoder style (default): byte-level BPE, eos = pad-distinct special tokens, a chat template; decode(encode(x))
    reproduces x exactly. ``encoder=True`` gives a BERT-style tokenizer: [CLS] x [SEP], a pad token and *no* EOS,
    the shape that trips RewardTrainer (see ``ensure_special_tokens``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if encoder:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", model_max_length=512)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ----------------------------------------------------------------------------------------------- tiny models
def tiny_config(arch: str, tokenizer: PreTrainedTokenizerBase, **overrides):
    """A small random-init config of the given family sized to ``tokenizer``."""
    dims = {**TINY_DEFAULTS, **overrides}
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **dims)
    if arch == "llama":
        return LlamaConfig(eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
                           max_position_embeddings=512, num_key_value_heads=dims["num_attention_heads"], **common)
    if arch == "qwen2":
        return Qwen2Config(eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
                           max_position_embeddings=512, num_key_value_heads=dims["num_attention_heads"], **common)
    if arch == "bert":
        return BertConfig(max_position_embeddings=512, **common)
    raise ConfigError(f"Unknown tiny-model arch '{arch}': choose llama, qwen2 or bert.")


def build_tiny_model(
    output_dir: str | os.PathLike,
    texts: Iterable[str],
    arch: str = "llama",
    head: str = "causal",
    vocab_size: int = 512,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **config_overrides,
) -> Path:
    """Train a tokenizer on ``texts`` (unless given), build a random-init model and save both to ``output_dir``.

    ``head="causal"`` gives ``AutoModelForCausalLM``; ``head="classifier"`` the sequence-classification twin with one
    label (a reward-model backbone). ``arch="bert"`` is always a classifier (an encoder reward backbone).
    """
    output_dir = Path(output_dir)
    if tokenizer is None:
        tokenizer = train_tokenizer(texts, vocab_size=vocab_size, encoder=(arch == "bert"))
    config = tiny_config(arch, tokenizer, **config_overrides)
    torch.manual_seed(seed)
    if head == "classifier" or arch == "bert":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    elif head == "causal":
        model = AutoModelForCausalLM.from_config(config)
    else:
        raise ConfigError(f"Unknown head '{head}': choose causal or classifier.")
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# ----------------------------------------------------------------------------------------------------- loading
def _check_source(path: str, what: str) -> None:
    """Fail early, with the path, for a local path that does not exist; Hub ids ("org/name") pass through."""
    if os.path.exists(path):
        return
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) and not path.startswith("."):
        return  # looks like a Hub id: let transformers try (and fail clearly offline)
    raise ArtifactError(f"{what} not found: {path}. Check the path, or give a Hub model id.")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError as e:
        raise ConfigError(f"Unknown dtype '{dtype}': use auto, float32, bfloat16 or float16.") from e


def load_tokenizer(
    path: str, padding_side: str = "right", trust_remote_code: bool = False, require_eos: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (pad = eos when the model has no pad token)."""
    _check_source(path, "Tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ArtifactError(f"Could not load a tokenizer from {path}: {e}") from e
    ensure_special_tokens(tok, source=path, require_eos=require_eos)
    tok.padding_side = padding_side
    return tok


def ensure_special_tokens(tok: PreTrainedTokenizerBase, source: str = "tokenizer", require_eos: bool = False) -> None:
    """Give ``tok`` a pad token if it lacks one; with ``require_eos`` fail clearly when there is no EOS token.

    BERT-style tokenizers have no EOS: use their SEP token as EOS (what RewardTrainer appends) rather than crash.
    """
    if tok.eos_token is None and tok.sep_token is not None:
        tok.eos_token = tok.sep_token
    if require_eos and tok.eos_token is None:
        raise ConfigError(
            f"The tokenizer of {source} has no EOS token (and no SEP token to stand in). Set `eos_token` in the "
            "recipe to a token of its vocabulary."
        )
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"The tokenizer of {source} has neither a pad nor an EOS token; set `pad_token`.")
        tok.pad_token = tok.eos_token


def _from_pretrained(auto_cls, path: str, what: str, dtype="auto", trust_remote_code=False,
                     allow_pickle_weights=False, sharded_by_trainer: bool = False, **kwargs) -> PreTrainedModel:
    from rlhf_lm.fsdp import full_weights_on_every_rank

    _check_source(path, what)
    # Under FSDP with cpu_ram_efficient_loading only the model the trainer shards may load empty on the other ranks
    # (accelerate broadcasts rank 0's weights into it); any other model must hold its weights everywhere.
    loading = contextlib.nullcontext() if sharded_by_trainer else full_weights_on_every_rank()
    try:
        with loading:
            return auto_cls.from_pretrained(
                path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle_weights else True, **kwargs,
            )
    except OSError as e:
        hint = (" Only safetensors weights load by default; set allow_pickle_weights: true to allow .bin files."
                if not allow_pickle_weights and "safetensors" in str(e).lower() else "")
        raise ArtifactError(f"Could not load the {what.lower()} from {path}: {e}.{hint}") from e


def load_causal_lm(path: str, dtype="auto", trust_remote_code=False, allow_pickle_weights=False, **kw):
    """Load a causal LM (policy / reference backbone). Safetensors only unless ``allow_pickle_weights``.
    ``sharded_by_trainer=True``: the model a Trainer will shard under FSDP (it may load empty on other ranks)."""
    return _from_pretrained(AutoModelForCausalLM, path, "Policy model", dtype, trust_remote_code,
                            allow_pickle_weights, **kw)


def load_sequence_classifier(path: str, dtype="auto", trust_remote_code=False, allow_pickle_weights=False, **kw):
    """Load a one-label sequence classifier (reward backbone)."""
    kw.setdefault("num_labels", 1)
    return _from_pretrained(AutoModelForSequenceClassification, path, "Reward model", dtype, trust_remote_code,
                            allow_pickle_weights, **kw)


def lora_config_from_args(args, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """A PEFT LoraConfig from ``ModelArguments`` (None when ``use_peft`` is off).

    For reward models pass ``task_type="SEQ_CLS"`` and the score head in ``modules_to_save`` so it is trained and
    saved with the adapter.
    """
    if not args.use_peft:
        return None
    from peft import LoraConfig

    targets = args.lora_target_modules
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]
    save = list(args.lora_modules_to_save or []) + list(modules_to_save or [])
    return LoraConfig(
        task_type=task_type, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets, bias="none", use_rslora=args.use_rslora, use_dora=args.use_dora,
        modules_to_save=save or None,
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def quantization_kwargs(args) -> dict:
    """``from_pretrained`` kwargs for QLoRA (``load_in_4bit`` / ``load_in_8bit`` in ModelArguments), else ``{}``.

    Uses TRL's helpers for the bitsandbytes config and device map; fails early, naming the key, where a quantized
    base cannot work (no GPU, bitsandbytes missing, or a full fine-tune).
    """
    if not (getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False)):
        return {}
    key = "load_in_4bit" if args.load_in_4bit else "load_in_8bit"
    if not args.use_peft:
        raise ConfigError(f"{key} needs use_peft: true: quantized base weights are frozen, only LoRA adapters train.")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key} (QLoRA) needs a CUDA GPU for bitsandbytes; unset it to train on this machine.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{key} needs bitsandbytes: pip install 'rlhf-lm[quantization]'.") from e
    from trl import get_kbit_device_map, get_quantization_config

    return {"quantization_config": get_quantization_config(args), "device_map": get_kbit_device_map()}


def load_policy_and_reference(cfg):
    """(policy, ref_model, peft_config) as DPOTrainer wants them for LoRA, LoRA-on-SFT, or a full fine-tune, from
    the DPO stage's config (``sft_adapter_path``, ``use_peft``, ``ref_model_name_or_path``, ...)."""
    kwargs = dict(dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                  allow_pickle_weights=cfg.allow_pickle_weights)
    policy = load_causal_lm(cfg.model_name_or_path, **kwargs, sharded_by_trainer=True, **quantization_kwargs(cfg))
    if cfg.sft_adapter_path:
        from peft import PeftModel

        if not (Path(cfg.sft_adapter_path) / "adapter_config.json").is_file():
            raise ArtifactError(f"sft_adapter_path {cfg.sft_adapter_path} holds no adapter_config.json; point it at "
                                "a saved LoRA adapter (an SFT stage's output).")
        # No peft_config: DPOTrainer then trains this adapter and keeps a frozen copy ("ref") as the reference.
        return PeftModel.from_pretrained(policy, cfg.sft_adapter_path, is_trainable=True), None, None
    if cfg.use_peft:
        return policy, None, lora_config_from_args(cfg)
    if cfg.precompute_ref_log_probs and not cfg.ref_model_name_or_path:
        return policy, None, None  # TRL scores the reference with the untouched policy before the first step
    return policy, load_causal_lm(cfg.ref_model_name_or_path or cfg.model_name_or_path, **kwargs), None


def classifier_head_name(model: torch.nn.Module) -> str:
    """The classification head to train in full and save with the adapter: `score` (decoders), `classifier` (BERT)."""
    for name in ("score", "classifier"):
        if hasattr(model, name):
            return name
    raise ConfigError(f"{type(model).__name__} has no `score` or `classifier` head; cannot train it as a reward model.")


def load_reward_tokenizer(cfg):
    """The backbone's tokenizer with the EOS token RewardTrainer appends (``eos_token`` in the recipe wins; BERT-style
    tokenizers use SEP) and a pad token; a clear ConfigError when neither can be found."""
    source = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    try:
        tokenizer = load_tokenizer(source, padding_side="right", trust_remote_code=cfg.trust_remote_code)
    except ConfigError:  # neither pad nor EOS: fine only if the recipe names the EOS token to use
        if cfg.eos_token is None:
            raise ConfigError(f"The tokenizer of {source} has no EOS, SEP or pad token; RewardTrainer ends every "
                              "text with EOS and the classifier reads its score there. Set eos_token in the recipe "
                              "to a token of its vocabulary.") from None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        tokenizer.padding_side = "right"
    if cfg.eos_token is not None:
        if cfg.eos_token not in tokenizer.get_vocab():
            raise ConfigError(f"eos_token '{cfg.eos_token}' is not in the vocabulary of the tokenizer of {source}. "
                              "Choose one of its tokens.")
        tokenizer.eos_token = cfg.eos_token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = cfg.eos_token
    ensure_special_tokens(tokenizer, source=source, require_eos=True)
    return tokenizer


def check_length_room(max_length: int | None, tokenizer) -> None:
    """``max_length`` must fit a prompt token, a response token, the EOS RewardTrainer appends and the tokenizer's
    own special tokens; otherwise TRL drops every pair and fails deep in its sampler."""
    if max_length is None:
        return
    needed = 3 + tokenizer.num_special_tokens_to_add()
    if max_length < needed:
        raise ConfigError(f"max_length={max_length} leaves no room for a prompt and a response: this tokenizer needs "
                          f"at least {needed} tokens (one of prompt, one of response, EOS and its special tokens). "
                          "Raise max_length.")


def readable_max_length(max_length: int | None, model, tokenizer, name: str) -> int | None:
    """``max_length``, lowered to the model's ``max_position_embeddings`` (and filled in when unset) where it asks for
    more than the model ``name`` can read; checked against the room a pair needs (:func:`check_length_room`)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if max_length is None or (limit and max_length > limit):
        logger.info("max_length=%s exceeds what %s can read; using its max_position_embeddings=%s.",
                    max_length, name, limit)
        max_length = limit
        check_length_room(max_length, tokenizer)
    return max_length
