"""A plain Python function wrapped as a RewardModel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf_lm.rewards.protocol import check_rewards


class FunctionReward:
    """Wrap a plain Python function ``fn(prompt, completion) -> float`` (or a batched one) as a RewardModel."""

    def __init__(self, fn: Callable, batched: bool = False, name: str | None = None):
        self.fn, self.batched = fn, batched
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        if self.batched:
            values = self.fn(prompts, completions)
        else:
            values = [self.fn(p, c) for p, c in zip(prompts, completions)]
        return check_rewards(values, len(prompts), self.name)  # converts lists, and names this reward on bad output

    def __repr__(self) -> str:
        return f"FunctionReward({self.name})"
