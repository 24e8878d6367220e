"""The built-in task's gold reward as a RewardModel: the judge ``reward_model: gold`` names."""

from __future__ import annotations

import torch

from rlhf_lm.rewards.function import FunctionReward


class GoldReward(FunctionReward):
    """The built-in task's programmatic gold reward (see :mod:`rlhf_lm.builtin_task.task`). Its prompts are text; a
    conversational prompt is judged by the text of its last message (the task's prompt, when the task is posed as a
    chat)."""

    def __init__(self):
        from rlhf_lm.builtin_task.task import gold_reward

        super().__init__(gold_reward, name="gold")

    def __call__(self, prompts: list, completions: list[str]) -> torch.Tensor:
        texts = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        return super().__call__(texts, completions)
