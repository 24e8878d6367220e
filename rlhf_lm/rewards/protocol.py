"""The reward-model protocol every consumer accepts, and the checks a reward model's output must pass.

A reward model is anything with ``__call__(prompts, completions) -> torch.Tensor``: one float per (prompt,
completion) pair, higher is better. PPO, GRPO/RLOO and evaluation take any such object, so a custom reward is a
plain class or function - no registration needed.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from rlhf_lm.errors import RewardError, describe

# The reply a reward model is probed with before training (any short text will do: the probe catches a spec that
# raises, or returns NaN or the wrong shape, whatever the input).
PROBE_COMPLETION = "OK."


@runtime_checkable
class RewardModel(Protocol):
    """Scores completions: ``reward(prompts, completions)`` returns a float tensor of shape ``(len(prompts),)``.

    Each prompt comes as the data has it: a string, or for conversational data a list of messages (system prompt
    and earlier turns included); each completion is the text of the reply, special tokens stripped. PPO, GRPO/RLOO
    and evaluation all call it this way, so a reward model sees the layout it was trained on.
    """

    def __call__(self, prompts: list[str | list[dict]], completions: list[str]) -> torch.Tensor: ...


def check_rewards(rewards, n: int, name: str) -> torch.Tensor:
    """Validate what a reward model returned: a finite float tensor of shape (n,). Errors name the reward."""
    if not isinstance(rewards, torch.Tensor):
        try:
            rewards = torch.as_tensor(rewards, dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise RewardError(f"Reward model {name} returned {type(rewards).__name__}; return a float tensor of "
                              f"shape ({n},).") from e
    rewards = rewards.detach().float().reshape(-1) if rewards.dim() == 2 and rewards.shape[-1] == 1 else rewards
    if rewards.shape != (n,):
        raise RewardError(f"Reward model {name} returned shape {tuple(rewards.shape)} for {n} completions; "
                          f"return one float per completion, shape ({n},).")
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()[:5]
        raise RewardError(f"Reward model {name} returned NaN/inf for completions at positions {bad}. Check its "
                          "normalisation (e.g. division by a zero std) and inputs.")
    return rewards.float()


def probe_reward(reward: RewardModel, prompts: list, completions: list[str] | None = None,
                 name: str | None = None) -> None:
    """Call ``reward`` once on a small sample, so a reward that raises or returns NaN / the wrong shape stops the run
    before training (not after it, when the trained model would be at stake)."""
    name = name or getattr(reward, "name", type(reward).__name__)
    prompts = list(prompts)[:2] or ["Hello."]
    completions = list(completions or [PROBE_COMPLETION] * len(prompts))[: len(prompts)]
    try:
        values = reward(prompts, completions)
    except RewardError:
        raise
    except Exception as e:
        raise RewardError(f"Reward model {name} failed when called on a sample before training: {describe(e)}.") from e
    check_rewards(values, len(prompts), name)
