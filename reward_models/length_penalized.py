"""A trained reward model with a length penalty: counters the classic "longer answers win" bias of reward models.

    reward_model: reward_models/length_penalized.py:LengthPenalized      # reads runs/reward by default

or from Python, pointing at any reward-stage artifact::

    from rlhf_lm.rewards import load_reward
    reward = load_reward("reward_models/length_penalized.py:LengthPenalized", reward_dir="runs/reward")

The classifier's score is normalised with the mean/std the reward stage saved, so ``penalty`` is in units of the
reward's standard deviation per word beyond ``target_words``. Check ``reward/length_corr`` in the reward stage's
metrics.json to see whether your reward model needs this.
"""

from __future__ import annotations

import torch

from rlhf_lm.rewards import ClassifierReward


class LengthPenalized:
    def __init__(self, reward_dir: str = "runs/reward", target_words: int = 16, penalty: float = 0.05,
                 device: str | None = None):
        self.classifier = ClassifierReward.from_pretrained(reward_dir, normalize=True, device=device)
        self.target_words, self.penalty = target_words, penalty
        self.name = f"LengthPenalized({reward_dir})"

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        scores = self.classifier(prompts, completions)
        excess = torch.tensor([max(0, len(c.split()) - self.target_words) for c in completions], dtype=torch.float32)
        return scores - self.penalty * excess
