"""benchmarks/real_model.py configures each stage from a dict of values; a key a stage no longer reads (or a value
it rejects) must fail here, in a second, not after the benchmark's first half hour."""

from __future__ import annotations

import importlib
import json

import pytest

from benchmarks import real_model
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


def test_the_gpu_size_trains_ppo_one_pass_over_its_prompts(tmp_path):
    from rlhf_lm.stages.ppo import CONFIG

    config = config_from_dict(CONFIG, stage_settings(tmp_path, tmp_path / "data", "model", SIZES["gpu"])["ppo"])
    assert config.num_train_epochs == 1 and config.max_steps in (-1, None)  # iterations follow the prompt count
    cpu = config_from_dict(CONFIG, stage_settings(tmp_path, tmp_path / "data", "model", SIZES["cpu"])["ppo"])
    assert cpu.max_steps == SIZES["cpu"].ppo_steps


def test_the_seed_reaches_every_stage(tmp_path):
    settings = stage_settings(tmp_path, tmp_path / "data", "path/to/model", SIZES["cpu"], seed=3)
    assert {values["seed"] for values in settings.values()} == {3}


def _report(seed: int, reward_accuracy: float, dpo_win: float, ppo_kl: float) -> dict:
    """The part of a result file that the seed summary reads."""
    return {"seed": seed, "machine": {"cpu": "test"}, "quality_seconds": 100.0 + seed, "quality": {
        "reward": {"reward/accuracy": reward_accuracy, "reward/length_baseline_accuracy": 0.45,
                   "reward/shorter_wins_accuracy": 0.55},
        "dpo": {"eval/implicit_accuracy": 0.6, "eval/win_rate": dpo_win, "eval/kl": 0.2},
        "ppo_eval": {"eval/win_rate": 0.7, "eval/kl": ppo_kl, "eval/length/policy": 20.0}}}


def test_seed_summary_gives_mean_std_and_checks_targets_on_the_worst_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(real_model, "ROOT", tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    reports = [_report(0, 0.60, 0.62, 0.3), _report(1, 0.59, 0.50, 1.2), _report(2, 0.64, 0.68, 0.6)]
    for report in reports:
        real_model.result_path("cpu", report["seed"]).write_text(json.dumps(report))
    results = tmp_path / "benchmarks" / "results"
    (results / "real_model_cpu_seeds.json").write_text("{}")  # an earlier summary
    (results / "real_model_cpu_seed3.partial.json").write_text(json.dumps(_report(3, 0.1, 0.1, 9.0)))  # unfinished
    summary = real_model.summarize_seeds("cpu")
    assert summary["seeds"] == [0, 1, 2]
    over = summary["stats"]["reward/over_length_baseline"]
    assert over["mean"] == pytest.approx(0.06) and over["worst"] == pytest.approx(0.04)  # better baseline: 0.55
    # sample std of 0.62, 0.50, 0.68: sqrt((0.02^2 + 0.10^2 + 0.08^2) / 2)
    assert summary["stats"]["dpo/win_rate"]["std"] == pytest.approx(0.0917, abs=1e-4)
    targets = summary["targets_on_worst_seed"]
    assert targets["reward/over_length_baseline"]["met"]  # worst +0.04 >= +0.03
    assert not targets["dpo/win_rate"]["met"] and targets["dpo/win_rate"]["worst"] == 0.50  # the mean 0.60 would pass
    assert not targets["ppo/kl"]["met"] and targets["ppo/kl"]["worst"] == 1.2  # lower is better: worst is the largest


def test_a_second_run_into_the_same_workdir_stops_before_training_and_keeps_the_first(tmp_path):
    earlier = tmp_path / "smoke_seed3" / "reward"
    earlier.mkdir(parents=True)
    (earlier / "adapter_model.safetensors").write_text("the first run's adapter")
    with pytest.raises(SystemExit, match=r"smoke_seed3 holds an earlier run \(reward\): delete it"):
        real_model.main(["--size", "smoke", "--seed", "3", "--workdir", str(tmp_path), "--skip-speed"])
    assert (earlier / "adapter_model.safetensors").read_text() == "the first run's adapter"
    assert sorted(p.name for p in (tmp_path / "smoke_seed3").iterdir()) == ["reward"]  # no splits written either


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


@pytest.mark.skipif(not HH_PAIRS.is_file(), reason="needs ../shared/data (absent in a user's clone)")
def test_reward_pairs_validation_split_is_neither_trained_on_nor_held_out(tmp_path):
    from benchmarks.reward_pairs import VALIDATION, write_split

    write_split(tmp_path / "v", 512, "validation")
    write_split(tmp_path / "h", 512, "held_out")
    train = set((tmp_path / "v" / "train.jsonl").read_text().splitlines())
    validation = (tmp_path / "v" / "test.jsonl").read_text().splitlines()
    held_out = set((tmp_path / "h" / "test.jsonl").read_text().splitlines())
    dpo_train = set((write_splits(tmp_path, SIZES["cpu"].dpo_train_pairs, "dpo") / "train.jsonl").read_text().splitlines())
    assert len(validation) == VALIDATION.stop - VALIDATION.start and len(train) == 512
    assert not set(validation) & (train | held_out | dpo_train)
    assert held_out == set((write_splits(tmp_path, 256) / "test.jsonl").read_text().splitlines())
    with pytest.raises(SystemExit, match="--pairs 1201"):
        write_split(tmp_path / "x", VALIDATION.start + 1, "validation")


def _samples(path, groups: list[tuple[int, int, bool]]) -> None:
    """samples.jsonl rows as the stages write them: (rows, of them won by the policy, policy answers shorter)."""
    short, long = "No.", " ".join(["No, I can't help with that."] * 3)
    rows = []
    for count, won, policy_shorter in groups:
        for i in range(count):
            policy, reference = (short, long) if policy_shorter else (long, short)
            rows.append({"prompt": "Hi", "policy": policy, "reference": reference,
                         "scores": {"reward_policy": 1.0 if i < won else 0.0, "reward_reference": 0.5}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.real
def test_seed_summary_reads_length_controlled_win_rates_from_the_runs_samples(tmp_path, monkeypatch, real_model_dir):
    monkeypatch.setattr(real_model, "ROOT", tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    for seed in (0, 1):
        real_model.result_path("cpu", seed).write_text(json.dumps(_report(seed, 0.6, 0.65, 0.3)))
    runs = tmp_path / "runs"
    # Seed 1's policy wins 0.65 by being shorter: shorter answers win 80% of the time whoever wrote them.
    _samples(real_model.seed_workdir(runs, "cpu", 1) / "dpo" / "samples.jsonl", [(30, 24, True), (10, 2, False)])
    # Its PPO wins 80% whatever the length.
    _samples(real_model.seed_workdir(runs, "cpu", 1) / "ppo_eval" / "samples.jsonl", [(30, 24, True), (10, 8, False)])
    summary = real_model.summarize_seeds("cpu", runs)
    assert summary["per_seed"][1]["dpo/lc_win_rate"] == pytest.approx(0.5, abs=0.01)
    assert summary["per_seed"][1]["ppo/lc_win_rate"] == pytest.approx(0.8, abs=1e-4)
    assert "dpo/lc_win_rate" not in summary["per_seed"][0]  # seed 0's run directory is gone
    assert summary["stats"]["dpo/lc_win_rate"]["n"] == 1 and summary["stats"]["dpo/win_rate"]["n"] == 2
