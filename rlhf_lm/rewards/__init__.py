"""Reward models: the protocol every consumer accepts, the built-in and trained reward models, and ``load_reward``.

A reward model is anything with ``__call__(prompts, completions) -> torch.Tensor`` (:class:`RewardModel`), so a custom
reward is a plain class or function - no registration needed. ``load_reward(spec)`` resolves the specs recipes use.

* :mod:`~rlhf_lm.rewards.protocol` - the protocol, and the checks a reward model's output must pass
* :mod:`~rlhf_lm.rewards.function` - a plain function as a reward (:class:`FunctionReward`)
* :mod:`~rlhf_lm.rewards.loading` - :func:`load_reward`
* :mod:`~rlhf_lm.rewards.classifier` - a trained reward-stage artifact or HF classifier (:class:`ClassifierReward`)
* :mod:`~rlhf_lm.rewards.layout` - the text a classifier scores, as TRL's RewardTrainer lays it out in training
* :mod:`~rlhf_lm.rewards.combine` - :class:`NormalizedReward` and :class:`EnsembleReward`
* :mod:`~rlhf_lm.rewards.trl_adapter` - a RewardModel as a TRL reward function (GRPO, RLOO)

The metrics a reward model is judged by (accuracy, ECE, length bias) live in :mod:`rlhf_lm.reward_metrics`.
Submodules import each other directly (never this package), so importing any one of them starts no cycle.
"""

from rlhf_lm.builtin_task.gold import GoldReward
from rlhf_lm.rewards.classifier import ClassifierReward
from rlhf_lm.rewards.combine import EnsembleReward, NormalizedReward, reward_stats
from rlhf_lm.rewards.function import FunctionReward
from rlhf_lm.rewards.layout import reward_input_ids, reward_text
from rlhf_lm.rewards.loading import load_reward
from rlhf_lm.rewards.protocol import RewardModel, check_rewards, probe_reward
from rlhf_lm.rewards.trl_adapter import TRLRewardFunction

__all__ = [
    "ClassifierReward",
    "EnsembleReward",
    "FunctionReward",
    "GoldReward",
    "NormalizedReward",
    "RewardModel",
    "TRLRewardFunction",
    "check_rewards",
    "load_reward",
    "probe_reward",
    "reward_input_ids",
    "reward_stats",
    "reward_text",
]
