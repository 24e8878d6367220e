"""benchmarks/real_model.py configures each stage from a dict of values; a key a stage no longer reads (or a value
it rejects) must fail here, in a second, not after the benchmark's first half hour."""

from __future__ import annotations

import importlib

import pytest

from benchmarks.real_model import HELD_OUT, HH_PAIRS, SIZES, stage_settings, write_splits
from rlhf_lm.configs import config_from_dict


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_stage_accepts_the_benchmark_settings(size, tmp_path):
    settings = stage_settings(tmp_path, tmp_path / "data", "path/to/model", SIZES[size])
    assert set(settings) == {"reward", "dpo", "ppo"}
    for stage, values in settings.items():
        config = config_from_dict(importlib.import_module(f"rlhf_lm.stages.{stage}").CONFIG, values)
        assert config.output_dir == str(tmp_path / stage)
        assert config.learning_rate == values["learning_rate"]


def test_dpo_trains_on_its_own_split_where_the_size_gives_one(tmp_path):
    data, dpo_data = tmp_path / "data", tmp_path / "data_dpo"
    settings = stage_settings(tmp_path, data, "path/to/model", SIZES["cpu"], dpo_data)
    assert settings["dpo"]["dataset_name"] == str(dpo_data)
    assert settings["reward"]["dataset_name"] == settings["ppo"]["dataset_name"] == str(data)


@pytest.mark.skipif(not HH_PAIRS.is_file(), reason="needs ../shared/data (absent in a user's clone)")
def test_splits_hold_out_the_same_pairs_whatever_the_training_size(tmp_path):
    small = write_splits(tmp_path, 256)
    large = write_splits(tmp_path, 512, "data_dpo")
    small_train = (small / "train.jsonl").read_text().splitlines()
    large_train = (large / "train.jsonl").read_text().splitlines()
    assert (len(small_train), len(large_train)) == (256, 512)
    assert large_train[:256] == small_train  # the larger split extends the smaller one
    assert (small / "test.jsonl").read_text() == (large / "test.jsonl").read_text()
    assert len((small / "test.jsonl").read_text().splitlines()) == HELD_OUT
    assert not set(large_train) & set((large / "test.jsonl").read_text().splitlines())
