"""A reward-stage LoRA adapter scored on the policy's own base weights: one base copy for policy, value, reference
and reward.

PPO with LoRA already keeps the policy (adapter), the value head (on the policy's trunk) and the reference (adapters
off) on one frozen base. A reward model trained by our reward stage is, typically, a LoRA adapter plus a ``score``
head on the *same* base checkpoint, so loading it as a second full model doubles the weight memory of the run.
:func:`load_reward_for_policy` instead loads it as a second, frozen, named PEFT adapter on the policy's model and
keeps the score head beside it; :class:`SharedBaseReward` then scores like the reward stage's classifier does:

    switch to the reward adapter (eval mode, no grad) -> trunk's last hidden state -> score head -> read the score
    at the last non-pad token (what a Llama/Qwen sequence classifier reads) -> switch back to the policy adapter.

The text goes through :func:`rlhf_lm.rewards.layout.reward_input_ids` with the reward model's own tokenizer, batched
and truncated exactly as :class:`~rlhf_lm.rewards.ClassifierReward` does (this class *is* one, with the
classifier swapped for the adapter scorer), so the shared and the separate reward model give the same scores.

Sharing needs the same base (checked by :mod:`rlhf_lm.same_base`); otherwise - or with ``share_reward_base:
false``, or with sharded parameters (FSDP, ZeRO-3) - the reward model is loaded separately, as before, and the
log says why.

Invariants the trainers rely on: the policy adapter is active everywhere outside a scoring call; the reward adapter
never requires grad (so it is in no optimizer and no DDP bucket), and every parameter's ``requires_grad`` and every
module's train/eval mode are restored after scoring exactly as they were (a controller may have frozen LoRA groups);
checkpoints and ``save_model`` save the active (policy) adapter only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_lm.errors import ArtifactError
from rlhf_lm.rewards import ClassifierReward, RewardModel, load_reward
from rlhf_lm.rewards.classifier import ADAPTER_CONFIG, find_adapter_base, read_reward_stats
from rlhf_lm.same_base import ADAPTER_WEIGHTS, share_problem

logger = logging.getLogger(__name__)

NOT_AN_ADAPTER = "the reward is not a reward-stage LoRA adapter"  # nothing to share (gold, a Python reward, ...)
OPTED_OUT = "share_reward_base: false"
HEAD_PREFIX = "base_model.model.score."  # where PEFT saves a sequence classifier's `score` (modules_to_save)


# ------------------------------------------------------------------------------------------------ scoring
def last_non_pad_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The column of each row's rightmost non-pad token: where transformers' ``*ForSequenceClassification`` (Llama,
    Qwen2, Mistral, ...) reads its score. With pad = EOS a plain-text reward reads the token before the final EOS,
    exactly as it did in training."""
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1)


@contextmanager
def adapter_active(policy, adapter_name: str) -> Iterator[None]:
    """Make ``adapter_name`` the active adapter of ``policy`` in eval mode for the block, then put everything back.

    PEFT's ``set_adapter`` also rewrites ``requires_grad`` (the active adapter trainable, the others frozen), which
    would thaw LoRA groups a controller froze; so every flag and every module's mode is restored as it was.
    """
    previous = policy.active_adapter
    grads = [(p, p.requires_grad) for p in policy.parameters()]
    modes = [(m, m.training) for m in policy.modules()]
    policy.set_adapter(adapter_name, inference_mode=True)
    policy.eval()
    try:
        yield
    finally:
        policy.set_adapter(previous)
        for param, flag in grads:
            param.requires_grad_(flag)
        for module, flag in modes:
            module.training = flag


class AdapterScorer(nn.Module):
    """A sequence classifier made of the policy's trunk with the reward adapter active and the reward's score head.

    Only the head is a submodule: ``.to()``, ``.eval()`` and ``.parameters()`` (which ClassifierReward calls) must
    not reach the policy, whose device and modes belong to its trainer. Inputs follow the trunk to its device.
    """

    def __init__(self, policy, adapter_name: str, head: nn.Linear, pad_token_id: int):
        super().__init__()
        self.__dict__["policy"] = policy  # a plain attribute, not a registered submodule (see above)
        self.adapter_name, self.pad_token_id = adapter_name, pad_token_id
        self.score = head
        self.config = policy.get_base_model().config

    def trunk(self) -> nn.Module:
        """The decoder under the LM head: the module a ``*ForSequenceClassification`` twin runs (same prefix)."""
        base = self.policy.get_base_model()
        return getattr(base, base.base_model_prefix)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.modeling_outputs import SequenceClassifierOutput

        trunk = self.trunk()
        device = trunk.get_input_embeddings().weight.device
        if self.score.weight.device != device:
            self.score.to(device)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        with adapter_active(self.policy, self.adapter_name):
            hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        # As the classifier does: the head over every position, then the last non-pad token's row.
        logits = self.score(hidden.to(self.score.weight.dtype))
        rows = torch.arange(input_ids.shape[0], device=device)
        return SequenceClassifierOutput(logits=logits[rows, last_non_pad_index(input_ids, self.pad_token_id)])


class SharedBaseReward(ClassifierReward):
    """A reward-stage LoRA reward model scored on the policy's base (see the module docstring). A RewardModel like
    any other: PPO, GRPO/RLOO and evaluation call it as ``reward(prompts, completions)``."""

    def __init__(self, policy, adapter_name: str, head: nn.Linear, tokenizer, batch_size: int = 32,
                 normalize: bool = False, mean: float | None = None, std: float | None = None,
                 name: str = "shared_reward"):
        scorer = AdapterScorer(policy, adapter_name, head, tokenizer.pad_token_id)
        super().__init__(scorer, tokenizer, batch_size=batch_size, normalize=normalize, mean=mean, std=std,
                         name=name)
        self.adapter_name = adapter_name

    def adapter_parameters(self) -> dict[str, torch.Tensor]:
        """The reward's weights: its LoRA factors on the policy's model and its score head (for checks and tests)."""
        marker = f".{self.adapter_name}."
        found = {n: p for n, p in self.model.policy.named_parameters() if marker in n}
        found.update({f"score.{n}": p for n, p in self.model.score.named_parameters()})
        return found

    def __repr__(self) -> str:
        return f"SharedBaseReward({self.name}, adapter={self.adapter_name!r}, normalize={self.normalize})"


# ---------------------------------------------------------------------------------------------- loading
def _unique_name(policy, wanted: str) -> str:
    name, i = wanted, 1
    while name in policy.peft_config:
        name, i = f"{wanted}_{i}", i + 1
    return name


def attach_reward_adapter(policy, path: Path, adapter_name: str) -> nn.Linear:
    """Add the reward-stage adapter in ``path`` to ``policy`` as a frozen adapter named ``adapter_name`` (not active)
    and return its score head, frozen."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(str(path))
    # On the causal LM the adapter is only its LoRA factors; the head lives beside it (HEAD_PREFIX keys).
    config.task_type = policy.peft_config[policy.active_adapter].task_type
    config.modules_to_save = None
    config.inference_mode = True
    state = load_file(str(path / ADAPTER_WEIGHTS))
    head_state = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    if "weight" not in head_state:
        raise ArtifactError(f"The reward adapter in {path} lacks its `score` head; it would score with a random "
                            "head. Retrain it with the score head in modules_to_save (the reward stage does).")
    # Creating the adapter and the head draws random initial weights (overwritten next): keep the caller's random
    # stream as it was, so a run with a shared reward samples exactly as one with a separate reward model.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        policy.add_adapter(adapter_name, config)
        weight = head_state["weight"]
        head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in head_state)
    result = set_peft_model_state_dict(policy, {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)},
                                       adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if f".{adapter_name}." in k]
    if result.unexpected_keys or missing:
        policy.delete_adapter(adapter_name)
        raise ArtifactError(f"The reward adapter in {path} does not fit the policy's modules (unexpected "
                            f"{result.unexpected_keys[:3]}, missing {missing[:3]}).")
    for name, param in policy.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(False)
    head.load_state_dict(head_state)
    # fp32 like ClassifierReward.from_pretrained's default: the head reads the trunk's hidden state cast to fp32.
    return head.float().requires_grad_(False)


def _place_adapter(path: Path, spec: str, policy, tokenizer) -> tuple[RewardModel, dict[str, Any]]:
    """The reward adapter in ``path`` on ``policy``'s base if it shares it, else a separate model (logged)."""
    problem, info = share_problem(path, policy, tokenizer)
    if problem:
        logger.warning("Reward model %s loaded as a separate model (a second copy of the base weights): %s.",
                       spec, problem)
        return load_reward(spec), {"shared_base": False, "reason": problem}
    name = _unique_name(policy, "reward")
    head = attach_reward_adapter(policy, path, name)
    stats = read_reward_stats(path)
    reward = SharedBaseReward(policy, name, head, info.pop("tokenizer"), mean=stats.get("reward_mean"),
                              std=stats.get("reward_std"), name=spec)
    logger.info("Reward model %s shares the policy's base: adapter '%s' on the same weights (sha256 %s).", spec,
                name, info["base_sha256"][:12])
    return reward, {"shared_base": True, "adapter_name": name,
                    "reason": "same base checkpoint (config and weights sha256), tokenizer and chat template",
                    "base_sha256": info["base_sha256"]}


def resolve_reward(spec, share: bool = True) -> Callable[[Any, Any], tuple[RewardModel, dict[str, Any]]]:
    """Resolve a reward spec before the policy loads (a bad spec fails now, not after the model is in memory), and
    return ``place(policy, tokenizer) -> (reward, layout)`` to call once the policy exists.

    Every spec but a reward-stage LoRA adapter is loaded here by :func:`rlhf_lm.rewards.load_reward`, as before. An
    adapter is checked here (its base must be found) and placed by ``place``: on the policy's base
    (:class:`SharedBaseReward`) when it was trained on it, else as a separate model, the log saying why. ``layout`` is
    what metrics.json and the model card record: ``{"shared_base": bool, "reason": str, ...}``.
    """
    path = Path(spec) if isinstance(spec, str) else None
    if path is None or not (path / ADAPTER_CONFIG).is_file() or not share:
        reward = load_reward(spec)
        reason = NOT_AN_ADAPTER if path is None or not (path / ADAPTER_CONFIG).is_file() else OPTED_OUT
        if reason == OPTED_OUT:
            logger.info("Reward model %s loaded as a separate model (%s).", spec, OPTED_OUT)
        return lambda policy, tokenizer: (reward, {"shared_base": False, "reason": reason})
    find_adapter_base(path)  # an adapter whose base cannot be found fails here, as load_reward would
    return functools.partial(_place_adapter, path, spec)


def load_reward_for_policy(spec, policy, tokenizer, share: bool = True) -> tuple[RewardModel, dict[str, Any]]:
    """Resolve a reward spec as :func:`rlhf_lm.rewards.load_reward` does, except that a reward-stage LoRA adapter
    whose base is the policy's own base is loaded onto the policy (one base copy, :class:`SharedBaseReward`). Returns
    the reward model and its layout (see :func:`resolve_reward`, which the stages call in two steps)."""
    return resolve_reward(spec, share)(policy, tokenizer)


# ------------------------------------------------------------------------------------------- TRL trainers
class PolicyAdapterOnlySaves:
    """Mixin for TRL's online trainers (GRPO, RLOO): checkpoints and ``save_model`` leave out shared reward adapters.

    transformers' ``Trainer._save`` calls ``save_pretrained`` on the PEFT model, which writes every adapter it holds
    (the others into sub-folders), so the frozen reward adapter would be saved as if this run had trained it. For the
    length of the call, ``save_pretrained`` is bound with ``selected_adapters`` = every adapter but the shared ones
    (TRL's own adapters, such as its "ref" copy, are saved as before).
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        shared = {getattr(fn, "reward", None).adapter_name for fn in getattr(self, "reward_funcs", [])
                  if isinstance(getattr(fn, "reward", None), SharedBaseReward)}
        model = self.accelerator.unwrap_model(self.model)
        if not shared or not hasattr(model, "peft_config"):
            return super()._save(output_dir, state_dict)
        keep = [name for name in model.peft_config if name not in shared]
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, selected_adapters=keep)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained  # the class's method again
