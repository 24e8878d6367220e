"""Whether a reward-stage LoRA adapter can be scored on the policy's own base (:mod:`rlhf_lm.shared_reward`).

Sharing needs the same base: the reward's base and the policy's must agree on their config *and* on their weights
(a SHA-256 of every trunk tensor, cast to the dtype the policy holds it in - not a comparison of names or paths),
and the two tokenizers must agree on vocabulary, special tokens and chat template; sharded parameters (FSDP, ZeRO-3)
cannot share at all. The checks say why not in a sentence (for the log and metrics.json) instead of raising: a
mismatch only means the reward model is loaded separately.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from rlhf_lm.rewards.classifier import ADAPTER_CONFIG, find_adapter_base

ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_NAMES = {"score", "classifier"}  # what PEFT adds to a SEQ_CLS adapter's modules_to_save by itself
# Config fields that fix the shape and arithmetic of a decoder trunk; two checkpoints that differ in one cannot share.
STRUCTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
                  "rms_norm_eps", "layer_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "sliding_window",
                  "attention_bias", "mlp_bias")


def trunk_tensors(policy) -> dict[str, torch.Tensor]:
    """The policy's frozen trunk weights by checkpoint name (PEFT's ``base_layer`` / ``original_module`` wrappers
    unwrapped; adapter weights and trained module copies left out)."""
    base = policy.get_base_model()
    prefix = base.base_model_prefix
    tensors = {}
    for name, tensor in getattr(base, prefix).state_dict().items():
        parts = name.split(".")
        if any(p.startswith(policy.base_model.prefix) for p in parts) or "modules_to_save" in parts:
            continue
        tensors[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = tensor
    return tensors


def weights_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over (name, shape, dtype, bytes) of each tensor, in the order given (callers sort by name). Tensors
    are read one at a time, so hashing a checkpoint never holds a second copy of it."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _weight_files(base: str) -> list[Path]:
    """The safetensors files of a base checkpoint: a local directory, or a Hub id (from the local cache offline)."""
    folder = Path(base)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(base, allow_patterns=["*.safetensors", "*.json"]))
    return sorted(folder.glob("*.safetensors"))


def stored_trunk_digest(base: str, like: dict[str, torch.Tensor], prefix: str) -> tuple[str | None, str]:
    """Digest of the trunk tensors stored in ``base``, each cast to the dtype of the policy's tensor of that name
    (a policy loaded in bf16 from an fp32 checkpoint is the bf16 copy of those weights). ``(None, why)`` if they
    cannot be matched name for name. Stored tensors the policy has no use for (e.g. an untied LM head) are skipped."""
    from safetensors import safe_open

    files = _weight_files(base)
    if not files:
        return None, "the reward's base checkpoint holds no safetensors weights to compare"
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(file), "pt")) for file in files]
        where = {key[len(prefix) + 1:]: (handle, key) for handle in handles for key in handle.keys()
                 if key.startswith(prefix + ".")}
        missing = sorted(set(like) - set(where))
        if missing:
            return None, f"the reward's base checkpoint lacks trunk weights the policy has (e.g. {missing[:3]})"
        return weights_digest((name, where[name][0].get_tensor(where[name][1]).to(like[name].dtype))
                              for name in sorted(like)), ""


def config_difference(reward_config, policy_config) -> str | None:
    """The first structural config field on which two checkpoints differ, as a sentence; None if none does."""
    ours, theirs = policy_config.get_text_config(), reward_config.get_text_config()
    for key in STRUCTURE_KEYS:
        a, b = getattr(theirs, key, None), getattr(ours, key, None)
        if a != b:
            return f"their configs differ in {key} ({a!r} for the reward's base, {b!r} for the policy)"
    return None


def tokenizer_difference(reward_tokenizer, policy_tokenizer) -> str | None:
    """How two tokenizers differ (vocabulary, special tokens, chat template, tokenization), as a sentence; or None."""
    if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        return "the tokenizers' vocabularies differ"
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        a, b = getattr(reward_tokenizer, attr, None), getattr(policy_tokenizer, attr, None)
        if a != b:
            return f"the tokenizers' {attr} differ ({a!r} for the reward model, {b!r} for the policy)"
    if (reward_tokenizer.chat_template or None) != (policy_tokenizer.chat_template or None):
        return "the tokenizers' chat templates differ"
    probe = "Hello world! 1 + 1 = 2."
    if reward_tokenizer(probe)["input_ids"] != policy_tokenizer(probe)["input_ids"]:
        return "the tokenizers encode text differently (special tokens added around it)"
    return None


def _params_sharded() -> str | None:
    """Sharded parameters (FSDP, DeepSpeed ZeRO-3) cannot run the trunk outside the sharded wrapper."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "the parameters are sharded (FSDP)"
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        return "the parameters are sharded (DeepSpeed ZeRO-3)"
    return None


def _adapter_problem(path: Path, adapter_config: dict[str, Any]) -> str | None:
    if adapter_config.get("peft_type") != "LORA":
        return f"it is a {adapter_config.get('peft_type')} adapter, not LoRA"
    if adapter_config.get("task_type") != "SEQ_CLS":
        return f"its task_type is {adapter_config.get('task_type')}, not SEQ_CLS (a reward-stage classifier)"
    extra = set(adapter_config.get("modules_to_save") or []) - HEAD_NAMES
    if extra:
        return f"it also trains full copies of {sorted(extra)} (modules_to_save), which the policy's base lacks"
    if not (path / ADAPTER_WEIGHTS).is_file():
        return f"it has no {ADAPTER_WEIGHTS}"
    return None


def share_problem(path: Path, policy, policy_tokenizer) -> tuple[str | None, dict[str, Any]]:
    """Why the reward adapter in ``path`` cannot be scored on ``policy``'s base (None if it can), and what was
    checked (the base, the weights digest)."""
    from peft import PeftModel
    from transformers import AutoConfig

    from rlhf_lm.modeling import load_tokenizer

    if not isinstance(policy, PeftModel) or policy.peft_type != "LORA":
        return "the policy is not a LoRA (PEFT) model, so its base weights are not frozen", {}
    sharded = _params_sharded()
    if sharded:
        return sharded, {}
    problem = _adapter_problem(path, json.loads((path / ADAPTER_CONFIG).read_text()))
    if problem:
        return f"the reward adapter cannot be shared: {problem}", {}
    base = find_adapter_base(path)
    info: dict[str, Any] = {}
    difference = config_difference(AutoConfig.from_pretrained(base), policy.get_base_model().config)
    if difference:
        return f"the reward model's base is not the policy's: {difference}", info
    reward_tokenizer = load_tokenizer(str(path) if (path / "tokenizer_config.json").is_file() else base)
    difference = tokenizer_difference(reward_tokenizer, policy_tokenizer)
    if difference:
        return f"{difference}, so the reward text would not be laid out as in its training", info
    ours = trunk_tensors(policy)
    stored, problem = stored_trunk_digest(base, ours, policy.get_base_model().base_model_prefix)
    if stored is None:
        return f"the weights cannot be compared: {problem}", info
    info["base_sha256"] = weights_digest((name, ours[name]) for name in sorted(ours))
    if stored != info["base_sha256"]:
        return (f"the reward model's base weights differ from the policy's (sha256 {stored[:12]} vs "
                f"{info['base_sha256'][:12]}), though their configs agree"), info
    info["tokenizer"] = reward_tokenizer
    return None, info
