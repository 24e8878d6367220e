"""benchmarks/real_model.py configures each stage from a dict of values; a key a stage no longer reads (or a value
it rejects) must fail here, in a second, not after the benchmark's first half hour."""

from __future__ import annotations

import importlib

import pytest

from benchmarks.real_model import SIZES, stage_settings
from rlhf_lm.configs import config_from_dict


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_stage_accepts_the_benchmark_settings(size, tmp_path):
    settings = stage_settings(tmp_path, tmp_path / "data", "path/to/model", SIZES[size])
    assert set(settings) == {"reward", "dpo", "ppo"}
    for stage, values in settings.items():
        config = config_from_dict(importlib.import_module(f"rlhf_lm.stages.{stage}").CONFIG, values)
        assert config.output_dir == str(tmp_path / stage)
        assert config.learning_rate == values["learning_rate"]
