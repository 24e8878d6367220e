"""The quickstart: the pipeline on the built-in task with a summary table, summary.json, a training-curve PNG and the
samples. The default test runs it at a reduced size (mechanics); the slow test runs README's command at full size
and checks the targets: <= 5 minutes and the gold reward raised by both DPO and PPO over the reference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_lm.quickstart import main, recipe_path

REQUIRED = ("reward_model/accuracy", "dpo/win_rate", "ppo/win_rate", "gold_reward/reference", "gold_reward/dpo",
            "gold_reward/ppo", "kl/dpo", "kl/ppo", "seconds")
SMALL = [
    "--task.num_pretrain_texts", "300", "--task.num_train_pairs", "96", "--task.num_eval_pairs", "32",
    "--task.pretrain_epochs", "1", "--task.hidden_size", "32", "--task.num_hidden_layers", "1",
    "--reward.num_train_epochs", "1", "--reward.per_device_train_batch_size", "16",
    "--dpo.num_train_epochs", "1", "--dpo.per_device_train_batch_size", "16", "--dpo.eval_num_prompts", "8",
    "--dpo.eval_max_new_tokens", "12",
    "--ppo.max_steps", "2", "--ppo.rollout_batch_size", "8", "--ppo.per_device_train_batch_size", "8",
    "--ppo.max_new_tokens", "12",
    "--eval_ppo.num_prompts", "8", "--eval_ppo.max_new_tokens", "12",
    "--reward.logging_steps", "1", "--dpo.logging_steps", "1", "--ppo.logging_steps", "1",  # curves with points
]


def test_packaged_recipe_is_the_repository_recipe():
    root = Path(__file__).resolve().parents[1]
    assert recipe_path().read_text() == (root / "recipes" / "quickstart.yaml").read_text()


def test_reduced_quickstart_writes_summary_plot_and_samples(tmp_path, capsys):
    run = tmp_path / "qs"
    assert main(["--output_dir", str(run), *SMALL]) == 0
    table = capsys.readouterr().out
    assert "reference" in table and "dpo" in table and "ppo" in table and "gold reward" in table

    summary = json.loads((run / "summary.json").read_text())
    for key in REQUIRED:
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert 0 <= summary["dpo/win_rate"] <= 1 and 0 <= summary["ppo/win_rate"] <= 1
    assert -1 <= summary["gold_reward/reference"] <= 1
    assert set(summary["seconds_per_stage"]) == {"task", "reward", "dpo", "ppo", "eval_ppo"}

    # DPO evaluates itself and eval_ppo evaluates PPO with the same prompts, seed and sampling: one reference
    dpo, eval_ppo = (json.loads((run / s / "metrics.json").read_text())["metrics"] for s in ("dpo", "eval_ppo"))
    assert dpo["eval/gold_reward/reference"] == pytest.approx(eval_ppo["eval/gold_reward/reference"], abs=1e-6)

    png = (run / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(run / "training_curves.png").shape
    assert height > 500 and width > 1000  # one row per trained stage (reward, dpo, ppo), three panels each

    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert all({"prompt", "reference", "dpo", "ppo"} <= set(r) and r["prompt"].endswith("\n") for r in rows)

    # a second run skips every finished stage and rebuilds the same summary
    assert main(["--output_dir", str(run), *SMALL]) == 0
    record = json.loads((run / "pipeline.json").read_text())
    assert {s["status"] for s in record["stages"].values()} == {"skipped"}
    again = json.loads((run / "summary.json").read_text())
    assert {k: again[k] for k in REQUIRED if k != "seconds"} == {k: summary[k] for k in REQUIRED if k != "seconds"}


@pytest.mark.slow
def test_full_quickstart_meets_its_targets(tmp_path):
    """README's command at full size: gold reward raised by DPO and by PPO over the reference.

    Its wall time (the <= 5 minute target) is printed with the summary and recorded in docs, not asserted: timing
    on a shared machine is a benchmark, not a test.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rlhf_lm", "quickstart", "--output_dir", str(tmp_path / "qs")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    print(json.dumps(summary, indent=2))
    assert summary["gold_reward/dpo"] > summary["gold_reward/reference"]
    assert summary["gold_reward/ppo"] > summary["gold_reward/reference"]
