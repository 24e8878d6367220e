"""The yardstick's worst-seed targets, end to end: the quickstart for two seeds (each seed its own task), as
benchmarks/quality.py runs it. A regression in robustness - one seed falling behind - fails here. About 5 minutes."""

from __future__ import annotations

import pytest

from benchmarks.quality import run_seed

WORST_SEED_TARGETS = {"reward_model/gold_accuracy": 0.78, "dpo/gold_win_rate": 0.70, "ppo/gold_win_rate": 0.70}


@pytest.mark.slow
def test_two_seeds_meet_the_worst_seed_targets(tmp_path):
    for seed in (0, 1):
        summary = run_seed(seed, tmp_path)
        for metric, bound in WORST_SEED_TARGETS.items():
            assert summary[metric] >= bound, (seed, metric, summary[metric])
        assert summary["gold_gain/dpo"] > 0 and summary["gold_gain/ppo"] > 0, summary
