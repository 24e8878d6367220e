"""Every stage writes metrics.json in one schema (``rlhf_lm.stages.common.METRICS_SCHEMA``): the same top-level keys,
each holding the same kind of value, and the ``metrics`` entry is what the stage's ``run()`` returned - so the
pipeline, the quickstart, the model card and the benchmarks read every stage the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_lm.configs import config_from_dict
from rlhf_lm.stages import STAGES
from rlhf_lm.stages.common import METRICS_SCHEMA

TINY_LORA = dict(lora_r=4, lora_alpha=8, use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0)
ONLINE = dict(reward_model="gold", max_steps=2, per_device_train_batch_size=8, learning_rate=3e-3, **TINY_LORA)


def stage_values(kind: str, task: Path, runs: Path) -> dict:
    """Each stage at its smallest on the tiny task: the mechanics, not the quality."""
    pairs = dict(model_name_or_path=str(task / "base_policy"), dataset_name=str(task / "data" / "pairs_train.jsonl"),
                 max_steps=2, per_device_train_batch_size=8, per_device_eval_batch_size=16, max_length=96,
                 learning_rate=3e-3, **TINY_LORA)
    prompts = dict(model_name_or_path=str(task / "base_policy"),
                   dataset_name=str(task / "data" / "prompts_train.jsonl"), **ONLINE)
    return {
        "task": dict(num_pretrain_texts=300, num_train_pairs=96, num_eval_pairs=32, pretrain_epochs=1, seed=1),
        "reward": dict(pairs, dataset_name=str(task / "data"), dataset_train_split="pairs_train",
                       dataset_eval_split="pairs_eval"),
        "dpo": dict(pairs, eval_dataset_name=str(task / "data" / "pairs_eval.jsonl"), eval_num_prompts=4,
                    eval_max_new_tokens=8),
        "ppo": dict(prompts, rollout_batch_size=8, max_new_tokens=8),
        "grpo": dict(prompts, num_generations=4, max_completion_length=8),
        "rloo": dict(prompts, num_generations=4, max_completion_length=8),
        "evaluate": dict(policy_path=str(runs / "dpo"), num_prompts=4, max_new_tokens=8,
                         pairs=str(task / "data" / "pairs_eval.jsonl"), max_length=96),
    }[kind]


@pytest.fixture(scope="module")
def stage_runs(tiny_task_dir, tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """kind -> (what run() returned, the metrics.json it wrote), for every stage in the STAGES table."""
    runs = tmp_path_factory.mktemp("stages")
    results = {}
    for kind, entry in STAGES.items():  # dpo runs before evaluate, which judges its policy
        out = runs / kind
        cfg = config_from_dict(entry.config_class, {**stage_values(kind, tiny_task_dir, runs), "output_dir": str(out)})
        returned = entry.run(cfg)
        results[kind] = (returned, json.loads((out / "metrics.json").read_text()))
    return results


def test_every_stage_writes_the_same_top_level_shape(stage_runs):
    assert set(stage_runs) == set(STAGES)
    for kind, (returned, saved) in stage_runs.items():
        assert sorted(saved) == sorted(METRICS_SCHEMA), kind
        assert saved["stage"] == kind
        assert isinstance(saved["metrics"], dict) and saved["metrics"], kind
        assert all(isinstance(v, dict) and "rows_in" in v for v in saved["data"].values()), kind
        assert isinstance(saved["run"], dict) and isinstance(saved["config"], dict), kind
        assert saved["controller"] is None, kind  # no controller: section in these runs
        assert isinstance(saved["log_history"], list), kind
        # the final numbers are what run() returned, name for name (JSON turns NaN into NaN, ints stay ints)
        assert json.loads(json.dumps(returned)) == saved["metrics"], kind


def test_metric_names_are_namespaced_alike(stage_runs):
    """One name for one thing in every stage: ``train/loss`` and ``train/runtime_s``, never ``train_loss``."""
    for kind, (_, saved) in stage_runs.items():
        names = set(saved["metrics"])
        assert not names & {"train_loss", "train_runtime"}, kind
        if kind in ("reward", "dpo", "ppo", "grpo", "rloo"):
            assert "train/runtime_s" in names and saved["log_history"], kind
            assert saved["run"]["num_processes"] == 1, kind
    for kind in ("reward", "dpo", "grpo", "rloo"):
        assert "train/loss" in stage_runs[kind][1]["metrics"], kind
    assert stage_runs["task"][1]["log_history"]  # the base policy's pre-training curves
    assert stage_runs["evaluate"][1]["log_history"] == []  # it trains nothing
    assert {"train", "eval"} <= set(stage_runs["dpo"][1]["data"]) and "pairs" in stage_runs["evaluate"][1]["data"]
