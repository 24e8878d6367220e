"""Progress a person can read: one bar per training stage with its key metrics, and one line per finished stage.

transformers' own progress callbacks print every log as a raw dict (``{'loss': '0.6931', 'grad_norm': ...,
'num_tokens': ...}``: a dozen to two dozen keys per line, hundreds of lines per run). :func:`show_progress` swaps them
for :class:`StageProgress`, which shows only the metrics the stage's :data:`~rlhf_lm.stages.STAGES` entry names as
worth plotting (its ``curves``). The logs themselves are untouched: ``state.log_history``, ``metrics.json`` and
``report_to`` still get every key.

On a terminal it draws a tqdm bar (on stderr, as tqdm does) with those metrics as its postfix. Where a bar would
come out as a pile of carriage returns (stderr redirected to a file or a CI log) or ``disable_tqdm`` is set, it prints
a compact line to stdout instead, at most about :data:`LINES_PER_STAGE` times per stage (plus every evaluation).

This module imports transformers (for the callback's base class); the pipeline imports it only once it runs stages,
which have loaded transformers by then anyway.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from rlhf_lm.stages import DEFAULT_CURVES, STAGES

MAX_SHOWN = 4  # metrics on one bar or line: more no longer fits a terminal line next to the bar itself
LINES_PER_STAGE = 10  # without a bar: about this many progress lines per stage, however often it logs
NAME_WIDTH = 10  # stage names padded to this, so progress and summary lines of a pipeline line up
EVAL_PREFIX = "eval_"  # transformers' prefix for the metrics of an evaluation during training
# The trainer's closing log (runtime, samples per second, mean loss): the stage's summary line says it better.
CLOSING_LOG_KEY = "train_runtime"


def format_value(value: Any) -> str:
    """A number at 4 significant digits (``0.6931``, ``1.2e-05``, ``1076``); anything else as ``str`` gives it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e6:
        return str(int(value))  # counts logged as floats (prompts, episodes) read better without ".0"
    return f"{value:.4g}"


def key_metrics(stage: str) -> tuple[str, ...]:
    """The metrics worth showing while ``stage`` (a stage kind) trains: its table entry's ``curves``, or the loss."""
    entry = STAGES.get(stage)
    curves = entry.curves if entry is not None else DEFAULT_CURVES
    return tuple(curves) or ("loss",)  # the task's base-policy pre-training has no curves worth a plot, but a loss


def shown_metrics(logs: Mapping[str, Any], names: Sequence[str], limit: int = MAX_SHOWN) -> dict[str, Any]:
    """The first ``limit`` of ``names`` that ``logs`` holds, in the order of ``names``. An evaluation's log holds
    them with transformers' ``eval_`` prefix: those are shown (with it) instead."""
    if any(key.startswith(EVAL_PREFIX) for key in logs):
        names = [name if name.startswith(EVAL_PREFIX) else EVAL_PREFIX + name for name in names]
    shown: dict[str, Any] = {}
    for name in dict.fromkeys(names):  # unique, in order
        if name in logs and len(shown) < limit:
            shown[name] = logs[name]
    return shown


def format_metrics(metrics: Mapping[str, Any], separator: str = "=", joiner: str = "  ") -> str:
    """``loss=0.6931  rewards/accuracies=0.75``."""
    return joiner.join(f"{name}{separator}{format_value(value)}" for name, value in metrics.items())


def short_names(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` with each name cut to its last part (``objective/kl`` -> ``kl``, ``eval_rewards/margins`` ->
    ``eval_margins``) where that stays unambiguous: a bar shares its line with the bar itself, and PPO's four full
    names alone fill 100 columns."""
    def short(name: str) -> str:
        prefix = EVAL_PREFIX if name.startswith(EVAL_PREFIX) else ""
        return prefix + name.removeprefix(prefix).rsplit("/", 1)[-1]

    shorts = [short(name) for name in metrics]
    if len(set(shorts)) < len(shorts):
        return dict(metrics)
    return dict(zip(shorts, metrics.values()))


def stage_summary(name: str, kind: str, metrics: Mapping[str, Any], status: str = "done") -> str:
    """One line for a finished stage ``name`` of kind ``kind``: its ``status`` (``done in 57 s``) and the final
    metrics its table entry names as its ``summary`` (a stage without an entry: its first few numbers)."""
    entry = STAGES.get(kind)
    if entry is not None and entry.summary:
        shown = {label: metrics[key] for key, label in entry.summary if key in metrics}
    else:
        shown = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
        shown = dict(list(shown.items())[:MAX_SHOWN])
    return f"{name:<{NAME_WIDTH}} {status:<16}  {format_metrics(shown, separator=' ', joiner=', ')}".rstrip()


class StageProgress(TrainerCallback):
    """One progress bar for a stage's training with its key metrics (``metrics``) as the postfix; on no terminal (or
    with ``disable_tqdm``), a line on stdout now and then. Only the main process shows anything."""

    def __init__(self, stage: str, metrics: Sequence[str], bar: bool | None = None):
        self.stage = stage
        self.metrics = tuple(metrics)
        self.bar_wanted = bar  # None: decide at train start from disable_tqdm and whether stderr is a terminal
        self.bar = None
        self.eval_bar = None  # while an evaluation runs under the bar: its batches, cleared when it ends
        self.shown_step = 0  # the last step the bar counted
        self.next_line_step = 0  # without a bar: the step from which the next progress line is due
        self.max_steps = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.max_steps = state.max_steps
        self.shown_step = self.next_line_step = state.global_step  # a resumed run starts part-way
        use_bar = self.bar_wanted
        if use_bar is None:
            use_bar = not args.disable_tqdm and sys.stderr.isatty()
        if use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.stage, unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.shown_step)
            self.shown_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or CLOSING_LOG_KEY in logs:
            return
        shown = shown_metrics(logs, self.metrics)
        if not shown:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(format_metrics(short_names(shown)), refresh=True)
            return
        # No bar: this run prints lines, or training has ended and this is a closing evaluation (DPO's), worth a line.
        evaluation = any(key.startswith(EVAL_PREFIX) for key in logs)
        if evaluation or state.global_step >= self.next_line_step or state.global_step >= self.max_steps:
            if not evaluation:
                self.next_line_step = state.global_step + max(1, math.ceil(self.max_steps / LINES_PER_STAGE))
            width = len(str(self.max_steps))
            print(f"{self.stage:<{NAME_WIDTH}} step {state.global_step:>{width}}/{self.max_steps}  {format_metrics(shown)}",
                  flush=True)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        # An evaluation of a real model can take minutes: without this the bar would look stuck meanwhile.
        if self.bar is None or eval_dataloader is None or not hasattr(eval_dataloader, "__len__"):
            return
        if self.eval_bar is None:
            from tqdm.auto import tqdm

            self.eval_bar = tqdm(total=len(eval_dataloader), desc=f"{self.stage} eval", leave=False,
                                 dynamic_ncols=True)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    on_predict = on_evaluate

    def on_train_end(self, args, state, control, **kwargs):
        self.on_evaluate(args, state, control)
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def show_progress(trainer, stage: str) -> StageProgress:
    """Show ``trainer``'s progress as :class:`StageProgress` for ``stage`` (a stage kind of
    :data:`~rlhf_lm.stages.STAGES`) instead of transformers' dict-printing callbacks; returns the callback.

    Works on any trainer with transformers' ``add_callback`` / ``remove_callback`` (TRL's and our PPO trainer)."""
    for default in _default_progress_callbacks():
        trainer.remove_callback(default)
    callback = StageProgress(stage, key_metrics(stage))
    trainer.add_callback(callback)
    return callback


def _default_progress_callbacks() -> tuple[type, ...]:
    """What transformers adds to print logs: ProgressCallback (bars), PrinterCallback (``disable_tqdm``), and in a
    notebook its own NotebookProgressCallback."""
    defaults: tuple[type, ...] = (ProgressCallback, PrinterCallback)
    try:
        from transformers.utils.notebook import NotebookProgressCallback
    except ImportError:  # the notebook callback needs IPython
        return defaults
    return (*defaults, NotebookProgressCallback)


__all__ = ["StageProgress", "format_metrics", "format_value", "key_metrics", "short_names", "shown_metrics",
           "show_progress", "stage_summary"]
