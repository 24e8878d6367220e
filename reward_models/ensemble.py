"""An ensemble: a trained reward model plus a format rule, each normalised to unit scale, then weighted.

    reward_model: reward_models/ensemble.py:ClassifierPlusFormat     # reads runs/reward by default

Normalising first makes the weights mean what they say: with ``weights=(0.8, 0.2)`` the classifier carries four
times the rule's influence whatever the raw scales of the two are. The classifier uses the mean/std saved by the
reward stage; the rule's statistics are measured once on ``calibration_file`` (prompt/chosen/rejected rows - the
reward model's own training pairs are a good choice) or, if none is given, taken as its nominal range.
"""

from __future__ import annotations

import json

from format_rule import FormatRule  # a sibling file: load_reward puts this folder on sys.path while loading

from rlhf_lm.rewards import ClassifierReward, EnsembleReward, NormalizedReward


class ClassifierPlusFormat(EnsembleReward):
    def __init__(self, reward_dir: str = "runs/reward", weights: tuple[float, float] = (0.8, 0.2),
                 calibration_file: str | None = None, device: str | None = None):
        classifier = ClassifierReward.from_pretrained(reward_dir, normalize=True, device=device)
        rule = FormatRule()
        if calibration_file:
            with open(calibration_file) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            prompts = [r["prompt"] for r in rows] * 2
            completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
            rule = NormalizedReward.fit(rule, prompts, completions)
        else:
            rule = NormalizedReward(rule, mean=0.0, std=1.0)  # the rule's scores already span [-1, 1]
        super().__init__([classifier, rule], weights=weights)
        self.name = f"ClassifierPlusFormat({reward_dir})"
