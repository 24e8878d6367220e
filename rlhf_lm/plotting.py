"""Training curves of a run as one PNG: a row per stage, a panel per metric, from each trainer's log history.

The log history is what every stage's Trainer logs (``logging_steps``): stages keep it in their ``metrics.json``
(``log_history``) or the pipeline records it in ``pipeline.json``. Matplotlib runs on the Agg backend, so plotting
works on a headless machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_lm.json_files import read_json_object
from rlhf_lm.stages import DEFAULT_CURVES, STAGES

MAX_PANELS = 3


def series(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged metric; entries without it are skipped, and so is the final summary entry.

    TRL puts the metrics of the steps since the last log into that summary (at the end of an epoch, often one small
    batch), which would draw a misleading last point.
    """
    steps, values = [], []
    for i, entry in enumerate(history):
        if "train_runtime" in entry:
            continue
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(float(entry.get("step", i)))
            values.append(float(value))
    return steps, values


def pick_curves(kind: str, history: list[dict[str, Any]]) -> list[str]:
    """The first MAX_PANELS of the stage's preferred metrics (its STAGES entry's ``curves``) that have at least two
    logged points."""
    preferred = STAGES[kind].curves if kind in STAGES else DEFAULT_CURVES
    chosen = [k for k in preferred if len(series(history, k)[1]) >= 2]
    return chosen[:MAX_PANELS]


def collect_histories(run_dir: str | Path) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Stage name -> (kind, log history), from the stages' metrics.json or else the pipeline record."""
    run_dir = Path(run_dir)
    record = read_json_object(run_dir / "pipeline.json") or {}
    kinds = ({p["name"]: p["kind"] for p in record.get("stage_plan", [])}
             or {p.name: p.name for p in sorted(run_dir.iterdir()) if p.is_dir()})
    recorded = record.get("log_history", {})
    out = {}
    for name, kind in kinds.items():
        metrics = read_json_object(run_dir / name / "metrics.json") or {}
        history = metrics.get("log_history") or recorded.get(name) or []
        if history:
            out[name] = (kind, history)
    return out


def plot_training_curves(run_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """Draw every stage's curves into ``path`` (default ``<run_dir>/training_curves.png``); None if nothing logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, kind, history, pick_curves(kind, history))
            for name, (kind, history) in collect_histories(run_dir).items()]
    rows = [r for r in rows if r[3]]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), MAX_PANELS, figsize=(4.2 * MAX_PANELS, 2.8 * len(rows)), squeeze=False)
    for (name, _, history, keys), row in zip(rows, axes):
        for ax, key in zip(row, keys):
            steps, values = series(history, key)
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.4)
            ax.set_title(f"{name}: {key}", fontsize=10)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
        for ax in row[len(keys):]:
            ax.axis("off")
    fig.tight_layout()
    path = Path(path) if path else Path(run_dir) / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
