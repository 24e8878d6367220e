"""``rlhf-lm quickstart --output_dir DIR``: the whole pipeline on the built-in task, offline, on CPU, in minutes.

It is the pipeline (``recipes/quickstart.yaml``: task -> reward -> dpo -> ppo -> eval_ppo) plus a report:

* a summary table on stdout and ``DIR/summary.json``: reward-model accuracy, DPO and PPO win-rates over the
  reference, the gold reward of the reference, DPO and PPO policies, their KL to the reference, and wall time;
* ``DIR/training_curves.png``: every stage's training curves (:mod:`rlhf_lm.plotting`);
* ``DIR/samples.jsonl``: per held-out prompt, the reference, DPO and PPO completions with their scores.

Re-running skips finished stages (``--force`` re-runs them); any other flag overrides the recipe like
``rlhf-lm pipeline`` does: ``--seed 1``, ``--ppo.max_steps 40``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from rlhf_lm.json_files import write_json
from rlhf_lm.pipeline import parse_args, plan_pipeline, run_pipeline

DEFAULT_OUTPUT_DIR = "runs/quickstart"
# summary key -> (stage, metric) in the pipeline's results; the first stage that has the metric wins.
SUMMARY_KEYS: dict[str, list[tuple[str, str]]] = {
    "reward_model/accuracy": [("reward", "reward/accuracy")],
    "reward_model/gold_accuracy": [("reward", "reward/gold_accuracy")],
    "dpo/win_rate": [("dpo", "eval/win_rate")],
    "ppo/win_rate": [("eval_ppo", "eval/win_rate")],
    "dpo/gold_win_rate": [("dpo", "eval/gold_win_rate")],
    "ppo/gold_win_rate": [("eval_ppo", "eval/gold_win_rate")],
    "gold_reward/reference": [("dpo", "eval/gold_reward/reference"), ("eval_ppo", "eval/gold_reward/reference")],
    "gold_reward/dpo": [("dpo", "eval/gold_reward/policy")],
    "gold_reward/ppo": [("eval_ppo", "eval/gold_reward/policy")],
    "kl/dpo": [("dpo", "eval/kl")],
    "kl/ppo": [("eval_ppo", "eval/kl")],
}
SAMPLE_SOURCES = {"dpo": "dpo", "ppo": "eval_ppo"}  # column in samples.jsonl -> stage whose samples.jsonl it is


def recipe_path() -> Path:
    """The quickstart recipe shipped inside the package (recipes/quickstart.yaml in a source checkout)."""
    return Path(str(resources.files("rlhf_lm") / "assets" / "quickstart.yaml"))


def summarize(results: dict[str, dict[str, Any]], seconds: float, stage_seconds: dict[str, float]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key, sources in SUMMARY_KEYS.items():
        for stage, metric in sources:
            value = results.get(stage, {}).get(metric)
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                summary[key] = float(value)
                break
    reference = summary.get("gold_reward/reference")
    for policy in ("dpo", "ppo"):
        if reference is not None and f"gold_reward/{policy}" in summary:
            summary[f"gold_gain/{policy}"] = summary[f"gold_reward/{policy}"] - reference
    summary["seconds"] = round(seconds, 1)
    summary["seconds_per_stage"] = {k: round(v, 1) for k, v in stage_seconds.items()}
    return summary


def format_table(summary: dict[str, Any]) -> str:
    ref = summary.get("gold_reward/reference")
    lines = [f"{'policy':<10} {'gold reward':>12} {'gain':>8} {'win-rate':>9} {'gold win':>9} {'KL':>7}",
             f"{'reference':<10} {_fmt(ref):>12} {'':>8} {'':>9} {'':>9} {'':>7}"]
    for policy in ("dpo", "ppo"):
        lines.append(f"{policy:<10} {_fmt(summary.get(f'gold_reward/{policy}')):>12} "
                     f"{_fmt(summary.get(f'gold_gain/{policy}'), sign=True):>8} "
                     f"{_fmt(summary.get(f'{policy}/win_rate')):>9} {_fmt(summary.get(f'{policy}/gold_win_rate')):>9} "
                     f"{_fmt(summary.get(f'kl/{policy}')):>7}")
    lines.append(f"reward model: held-out accuracy {_fmt(summary.get('reward_model/accuracy'))} "
                 f"(vs gold preference {_fmt(summary.get('reward_model/gold_accuracy'))}); "
                 f"total {summary['seconds']:.0f} s")
    return "\n".join(lines)


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if sign else f"{value:.3f}"


def merge_samples(run_dir: Path, path: Path) -> int:
    """One line per held-out prompt with the reference, DPO and PPO completions side by side; returns the count."""
    columns = {}
    for name, stage in SAMPLE_SOURCES.items():
        file = run_dir / stage / "samples.jsonl"
        if file.is_file():
            columns[name] = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    if not columns:
        return 0
    rows = []
    for i, first in enumerate(next(iter(columns.values()))):
        row = {"prompt": first["prompt"], "reference": first["reference"]}
        for name, samples in columns.items():
            if i < len(samples) and samples[i]["prompt"] == first["prompt"]:
                row[name] = samples[i]["policy"]
                row[f"{name}_scores"] = samples[i].get("scores", {})
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def _process_start() -> float:
    """When this process started (so ``seconds`` includes Python and library start-up, as a user waits for it)."""
    try:
        import psutil

        return time.perf_counter() - (time.time() - psutil.Process().create_time())
    except ImportError:  # psutil comes with accelerate; without it, count from here
        return time.perf_counter()


def _one_thread_for_tiny_models() -> None:
    """The quickstart's models are tiny: on CPU one intra-op thread runs them 2.5-8x faster than several (thread
    start-up dominates such small matmuls). Respects an explicit OMP_NUM_THREADS."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(1)


@contextmanager
def only_stage_progress_bars() -> Iterator[None]:
    """The quickstart's data and models are tiny: the bars datasets and transformers draw while mapping and loading
    them (a dozen per stage, each done in a blink) would bury the one bar per stage that :mod:`rlhf_lm.progress`
    draws. They are switched off while it runs, and back on after."""
    import datasets
    from transformers.utils import logging as hf_logging

    data_bars, model_bars = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if data_bars:
            datasets.enable_progress_bars()
        if model_bars:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    start = _process_start()
    argv = list(argv or [])
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return 0
    if not any(a.split("=")[0] in ("--output_dir", "--output-dir") for a in argv):
        argv += ["--output_dir", DEFAULT_OUTPUT_DIR]
    _one_thread_for_tiny_models()
    recipe, _, output_dir = parse_args(["--config", str(recipe_path()), *argv])
    pipeline = plan_pipeline(recipe, source="the quickstart recipe", output_dir=output_dir)
    with only_stage_progress_bars():
        results = run_pipeline(pipeline)

    run_dir = pipeline.output_dir
    record = json.loads((run_dir / "pipeline.json").read_text())
    stage_seconds = {name: s["seconds"] for name, s in record["stages"].items()}
    summary = summarize(results, time.perf_counter() - start, stage_seconds)
    write_json(run_dir / "summary.json", summary)

    from rlhf_lm.plotting import plot_training_curves

    plot = plot_training_curves(run_dir)
    n_samples = merge_samples(run_dir, run_dir / "samples.jsonl")
    print()
    print(format_table(summary))
    print(f"\nWrote {run_dir / 'summary.json'}"
          + (f", {plot}" if plot else "") + (f", {run_dir / 'samples.jsonl'} ({n_samples} prompts)" if n_samples else ""))
    return 0
