"""A RewardModel adapted to the reward-function signature of TRL's online trainers (GRPO, RLOO)."""

from __future__ import annotations

from rlhf_lm.rewards.protocol import RewardModel, check_rewards


class TRLRewardFunction:
    """A RewardModel in the shape TRL's online trainers call: ``fn(prompts, completions, **kwargs) -> list[float]``.

    Prompts go to the reward model as the data has them (a conversation stays a list of messages, system prompt and
    earlier turns included), so a classifier lays them out as in its training; a conversational completion (TRL
    passes ``[{"role": "assistant", "content": ...}]``) goes as the text of its reply, as PPO and evaluation pass it.
    """

    def __init__(self, reward: RewardModel, name: str):
        self.reward = reward
        self.__name__ = name  # TRL logs rewards/<__name__>/mean

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        def reply(completion):
            return completion if isinstance(completion, str) else completion[-1]["content"]

        values = self.reward(list(prompts), [reply(c) for c in completions])
        return check_rewards(values, len(completions), self.__name__).tolist()
