"""The pipeline: artifacts flow from stage to stage, finished stages are skipped, forcing re-runs them and what
depends on them, a failing stage corrupts nothing, and bad recipes fail with clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_lm.errors import ArtifactError, ConfigError
from rlhf_lm.pipeline import main, plan_pipeline, run_pipeline

TESTS = Path(__file__).parent
SCORE = "pipeline_stage"  # tests/pipeline_stage.py: a custom stage module (the pipeline accepts module paths)
TINY_TASK = {"num_pretrain_texts": 200, "num_train_pairs": 40, "num_eval_pairs": 16, "pretrain_epochs": 1,
             "hidden_size": 32, "num_hidden_layers": 1}


@pytest.fixture(autouse=True)
def _stage_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def recipe(run_dir: Path, **extra) -> dict:
    return {"output_dir": str(run_dir), "stages": ["task", "score"], "seed": 3, "task": dict(TINY_TASK),
            "score": {"stage": SCORE}, **extra}


def statuses(run_dir: Path) -> dict[str, str]:
    record = json.loads((run_dir / "pipeline.json").read_text())
    return {name: s["status"] for name, s in record["stages"].items()}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_artifacts_flow_and_finished_stages_are_skipped(tmp_path, caplog):
    run_dir = tmp_path / "run"
    plan = plan_pipeline(recipe(run_dir))
    task, score = plan.stages
    # the custom stage got the task's base policy, data splits and gold flag; the shared seed reached the task
    assert score.values["model_name_or_path"] == str(run_dir / "task" / "base_policy")
    assert score.values["dataset_name"] == str(run_dir / "task" / "data")
    assert (score.values["dataset_train_split"], score.values["dataset_eval_split"]) == ("pairs_train", "pairs_eval")
    assert score.values["gold"] is True and task.values["seed"] == 3
    assert score.inputs == {"base_model": "task", "preference_data": "task", "gold": "task"}

    results = run_pipeline(plan)
    assert statuses(run_dir) == {"task": "ran", "score": "ran"}
    assert results["score"]["score/rows"] == 40 and results["score"]["score/eval_rows"] == 16
    assert -1 <= results["score"]["score/gold_chosen"] <= 1
    assert (run_dir / "task" / "metrics.json").is_file() and not (run_dir / "task.partial").exists()

    mtime = (run_dir / "score" / "metrics.json").stat().st_mtime_ns
    again = run_pipeline(plan_pipeline(recipe(run_dir)))
    assert statuses(run_dir) == {"task": "skipped", "score": "skipped"}
    assert again["score"]["score/rows"] == 40
    assert (run_dir / "score" / "metrics.json").stat().st_mtime_ns == mtime

    # a finished stage is kept even when the recipe changed, with a warning that names the changed keys
    changed = recipe(run_dir)
    changed["score"]["tag"] = "new"
    with caplog.at_level("WARNING", logger="rlhf_lm.pipeline"):
        run_pipeline(plan_pipeline(changed))
    assert statuses(run_dir) == {"task": "skipped", "score": "skipped"}
    assert "['tag']" in caplog.text and "--force score" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rlhf_lm.pipeline"):  # still told on the next run: nothing re-ran
        run_pipeline(plan_pipeline(changed))
    assert "['tag']" in caplog.text

    # forcing one stage re-runs it alone; forcing the task re-runs everything that consumed its artifacts
    run_pipeline(plan_pipeline(recipe(run_dir, force=["score"])))
    assert statuses(run_dir) == {"task": "skipped", "score": "ran"}
    run_pipeline(plan_pipeline(recipe(run_dir, force=["task"])))
    assert statuses(run_dir) == {"task": "ran", "score": "ran"}


def test_failed_stage_leaves_previous_output_untouched(tmp_path):
    run_dir = tmp_path / "run"
    run_pipeline(plan_pipeline(recipe(run_dir)))
    before = snapshot(run_dir / "score")

    failing = recipe(run_dir, force=["score"])
    failing["score"].update(fail=True, tag="second")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(plan_pipeline(failing))
    assert snapshot(run_dir / "score") == before
    assert (run_dir / "score.partial" / "partial.txt").is_file()  # the crash happened mid-write, in the side dir
    # the task was finished before the failure and stays finished: the re-run continues at the failed stage
    fixed = recipe(run_dir, force=["score"])
    fixed["score"]["tag"] = "fixed"
    results = run_pipeline(plan_pipeline(fixed))
    assert statuses(run_dir) == {"task": "skipped", "score": "ran"}
    assert results["score"]["score/tag"] == "fixed"


def test_cli_overrides_and_force(tmp_path):
    run_dir = tmp_path / "run"
    path = tmp_path / "pipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe(tmp_path / "ignored")))
    assert main(["--config", str(path), "--output_dir", str(run_dir), "--score.tag", "cli", "--seed", "4"]) == 0
    metrics = json.loads((run_dir / "score" / "metrics.json").read_text())
    assert metrics["metrics"]["score/tag"] == "cli"
    assert json.loads((run_dir / "task" / "metrics.json").read_text())["config"]["seed"] == 4
    assert not (tmp_path / "ignored").exists()
    assert main(["--config", str(path), "--output_dir", str(run_dir), "--force", "score"]) == 0
    assert statuses(run_dir) == {"task": "skipped", "score": "ran"}


@pytest.mark.parametrize("bad, message", [
    ({"stages": ["task", "revard"]}, "Unknown stage 'revard'.*Did you mean 'reward'"),
    ({"stages": []}, "needs `stages:`"),
    ({"stages": ["task", "task"]}, "appears twice"),
    ({"stages": ["task"], "task": {"num_train_pair": 3}}, "Unknown config key 'num_train_pair'.*'num_train_pairs'"),
    ({"stages": ["task"], "sede": 1}, "Unknown config key 'sede'.*Did you mean 'seed'"),
    ({"stages": ["task"], "score": {"gold": True}}, "section 'score' is not in `stages`"),
    ({"stages": ["task"], "force": ["dpo"]}, "not in this pipeline"),
    ({"stages": ["task"], "push_to_hub": True}, "hub_repo_id is not set"),
    ({"stages": ["task", "score"], "score": {"stage": SCORE, "inputs": {"base_model": "nope"}}},
     "not an earlier stage"),
    ({"stages": ["task", "score", "s2"], "score": {"stage": SCORE}, "s2": {"stage": SCORE, "inputs": {"reward_model": "score"}}},
     "provides \\['policy'\\], not 'reward_model'"),
])
def test_bad_recipes_fail_clearly(bad, message):
    with pytest.raises(ConfigError, match=message):
        plan_pipeline(bad)


def test_missing_artifact_is_a_clear_error(tmp_path):
    plan = plan_pipeline({"output_dir": str(tmp_path / "run"), "stages": ["score"],
                          "score": {"stage": SCORE, "model_name_or_path": str(tmp_path / "no_such_model"),
                                    "dataset_name": str(tmp_path / "none.jsonl")}})
    with pytest.raises(ArtifactError, match="no_such_model"):
        run_pipeline(plan)
    assert not (tmp_path / "run" / "score").exists()


def test_cli_prints_one_line_error(tmp_path):
    path = tmp_path / "pipe.yaml"
    path.write_text("stages: [task, rewrd]\n")
    proc = subprocess.run([sys.executable, "-m", "rlhf_lm", "pipeline", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Unknown stage 'rewrd'" in proc.stderr and "Traceback" not in proc.stderr


def test_yaml_scientific_notation_becomes_a_number():
    """PyYAML reads `1e-3` (no dot) as a string; numeric config fields still get a float (as TrlParser gives)."""
    from rlhf_lm.pipeline import build_config

    plan = plan_pipeline({"stages": ["task"], "task": {"label_temperature": "3e-1", "num_train_pairs": "1e2"}})
    cfg = build_config(plan.stages[0])
    assert cfg.label_temperature == 0.3 and cfg.num_train_pairs == 100 and isinstance(cfg.num_train_pairs, int)


def test_a_finished_stage_leaves_no_model_behind(tmp_path):
    """Trainer, callbacks and model form reference cycles: without a collection between stages the next stage would
    load its model while the previous one's still lives (the task's two models, or DPO's policy, say)."""
    results = run_pipeline(plan_pipeline(recipe(tmp_path / "run")))  # the task stage pre-trains a base policy
    assert results["score"]["score/models_at_start"] == 0
