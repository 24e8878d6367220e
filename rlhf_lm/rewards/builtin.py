"""Built-in reward models: a plain Python function wrapped as a RewardModel, and the built-in task's gold reward."""

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


class GoldReward(FunctionReward):
    """The built-in task's programmatic gold reward (see ``rlhf_lm.task``). Its prompts are text; a conversational
    prompt is judged by the text of its last message (the task's prompt, when the task is posed as a chat)."""

    def __init__(self):
        from rlhf_lm.task import gold_reward

        super().__init__(gold_reward, name="gold")

    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        return super().__call__(texts, completions)
