"""Reward wrappers that put rewards on a common scale and combine them: :class:`NormalizedReward` and
:class:`EnsembleReward`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from rlhf_lm.errors import RewardError
from rlhf_lm.rewards.protocol import RewardModel, check_rewards


def reward_stats(reward: RewardModel, prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[float, float]:
    """Mean and std of ``reward`` over a calibration set (e.g. responses from the training data)."""
    values = check_rewards(reward(list(prompts), list(completions)), len(prompts), _name(reward))
    return values.mean().item(), values.std(unbiased=False).item()


class NormalizedReward:
    """``(reward - mean) / std`` with fixed statistics: puts any reward model on a unit scale.

    Fixed (not per-batch) statistics keep a completion's reward independent of what it is batched with. Get them from
    a reward-stage artifact, or from :meth:`fit` on a calibration set.
    """

    def __init__(self, reward: RewardModel, mean: float, std: float, name: str | None = None):
        if not std or not math.isfinite(std) or not math.isfinite(mean):
            raise RewardError(f"NormalizedReward({_name(reward)}): std must be a positive finite number, got "
                              f"mean={mean}, std={std}. Calibrate on completions whose rewards differ.")
        self.reward, self.mean, self.std = reward, float(mean), float(std)
        self.name = name or f"normalized({_name(reward)})"

    @classmethod
    def fit(cls, reward: RewardModel, prompts: Sequence[Any], completions: Sequence[Any]) -> NormalizedReward:
        mean, std = reward_stats(reward, prompts, completions)
        return cls(reward, mean, std)

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        raw = check_rewards(self.reward(prompts, completions), len(prompts), _name(self.reward))
        return (raw - self.mean) / self.std

    def __repr__(self) -> str:
        return f"NormalizedReward({_name(self.reward)}, mean={self.mean:.4g}, std={self.std:.4g})"


class EnsembleReward:
    """A weighted sum of reward models, each first normalised to mean 0 / std 1 (so weights mean what they say).

    A member that is already normalised (a ``NormalizedReward``, or a ``ClassifierReward`` with ``normalize=True``)
    is used as is; others are normalised with statistics from ``calibration=(prompts, completions)``. Pass
    ``normalize=False`` to add raw rewards.
    """

    def __init__(
        self,
        members: Sequence[RewardModel],
        weights: Sequence[float] | None = None,
        normalize: bool = True,
        calibration: tuple[Sequence[Any], Sequence[Any]] | None = None,
    ):
        if not members:
            raise RewardError("EnsembleReward needs at least one member reward model.")
        weights = list(weights) if weights is not None else [1.0 / len(members)] * len(members)
        if len(weights) != len(members):
            raise RewardError(f"EnsembleReward: {len(members)} members but {len(weights)} weights.")
        for m in members:
            if not callable(m):
                raise RewardError(f"EnsembleReward member {m!r} is not callable; members must be reward models.")
        self.weights = [float(w) for w in weights]
        if normalize:
            members = [self._normalized(m, calibration) for m in members]
        self.members = list(members)

    @staticmethod
    def _normalized(member: RewardModel, calibration) -> RewardModel:
        if isinstance(member, NormalizedReward) or getattr(member, "normalize", False) is True:
            return member
        if calibration is None:
            raise RewardError(f"EnsembleReward: member {_name(member)} is not normalised and no calibration set was "
                              "given. Pass calibration=(prompts, completions), wrap it in NormalizedReward, or "
                              "set normalize=False.")
        return NormalizedReward.fit(member, *calibration)

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        total = torch.zeros(len(prompts))
        for w, m in zip(self.weights, self.members, strict=True):
            total += w * check_rewards(m(prompts, completions), len(prompts), _name(m))
        return total

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:g}*{_name(m)}" for w, m in zip(self.weights, self.members, strict=True))
        return f"EnsembleReward({parts})"


def _name(reward: Any) -> str:
    return getattr(reward, "name", None) or type(reward).__name__
