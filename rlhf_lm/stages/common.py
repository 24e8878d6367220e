"""Steps that more than one stage takes, written once: where a training run writes while it runs, the metrics every
trained stage reports, ``metrics.json`` and its config record, and which held-out prompts a closing evaluation
samples on.

A stage module calls these in the order it runs them; nothing here decides what a stage trains or how.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from accelerate import PartialState

from rlhf_lm.artifacts import METRICS_FILE, check_output_dir, partial_dir, resolve_resume, staged_output
from rlhf_lm.builtin_task.task import task_eval_prompts
from rlhf_lm.data.prompts import normalize_prompts
from rlhf_lm.data.readers import load_rows
from rlhf_lm.data.report import DataReport
from rlhf_lm.errors import ConfigError, describe
from rlhf_lm.fsdp import state_bytes_per_rank
from rlhf_lm.json_files import write_json


def require_model(cfg, what: str) -> None:
    """Fail at once, saying what ``model_name_or_path`` is for (``what``), when a stage's config has none."""
    if not cfg.model_name_or_path:
        raise ConfigError(f"Set model_name_or_path: {what}.")


def check_output_and_resume(cfg) -> str | None:
    """The checkpoint to resume from (None: start afresh), after checking ``cfg.output_dir`` may be written: both
    before anything is loaded, so a wrong directory or a missing checkpoint fails in a second."""
    check_output_dir(cfg.output_dir, overwrite=cfg.overwrite_output_dir, resume=cfg.resume_from_checkpoint)
    return resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)


def prepare_online_run(cfg):
    """What PPO, GRPO and RLOO do before loading the policy, in this order so that a mistake fails in a second: the
    required keys, the output directory and the checkpoint to resume from, the reward spec resolved, the
    left-padding tokenizer (with an EOS, where generation stops), and the prompt data.

    Returns ``(resume, place_reward, tokenizer, train, eval_ds, report)``; ``place_reward(policy, tokenizer)`` puts
    the reward model on the policy's base or beside it (:func:`rlhf_lm.shared_reward.resolve_reward`).
    """
    from rlhf_lm.data.loading import load_prompt_data
    from rlhf_lm.modeling import load_tokenizer
    from rlhf_lm.shared_reward import resolve_reward

    require_model(cfg, "the policy to start from (e.g. the task's base_policy)")
    if not cfg.reward_model:
        raise ConfigError("Set reward_model: 'gold', a reward-stage output dir, 'pkg.mod:Name' or 'file.py:Name'.")
    resume = check_output_and_resume(cfg)
    place_reward = resolve_reward(cfg.reward_model, share=cfg.share_reward_base)  # a bad spec fails before loading
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path, padding_side="left",
                               trust_remote_code=getattr(cfg, "trust_remote_code", False), require_eos=True)
    train, eval_ds, report = load_prompt_data(cfg, cfg.seed, tokenizer)
    return resume, place_reward, tokenizer, train, eval_ds, report


def staging(cfg, stage: str):
    """The directory a training run writes into until it has finished (see :func:`rlhf_lm.artifacts.staged_output`).

    Only the main process stages (and finally moves) it; the other ranks write their share of a checkpoint to the
    same partial directory."""
    if PartialState().is_main_process:
        return staged_output(cfg.output_dir, stage=stage, overwrite=cfg.overwrite_output_dir,
                             resume=cfg.resume_from_checkpoint, drop_checkpoints=True)
    return nullcontext(partial_dir(cfg.output_dir))


@contextmanager
def checkpoints_in(cfg, stage: Path) -> Iterator[None]:
    """``cfg.output_dir`` pointed at the staging dir while the trainer is built and trains, so its checkpoints go
    there (a crash leaves them for resuming); the final output dir is put back however training ends."""
    final_dir = cfg.output_dir
    cfg.output_dir = str(stage)
    try:
        yield
    finally:
        cfg.output_dir = final_dir


def train_metrics(result, trainer, trainable: int, steps: bool = False) -> dict[str, float]:
    """What a trained stage reports of its training: final loss, runtime, optimizer steps (``steps``: DPO reports
    them, the reward stage never has), trainable parameters, and the memory the weights, gradients and optimizer
    state take per rank."""
    metrics = {"train/loss": result.training_loss,
               "train/runtime_s": result.metrics.get("train_runtime", float("nan"))}
    if steps:
        metrics["train/steps"] = float(trainer.state.global_step)
    return {**metrics, "train/trainable_params": float(trainable),
            **state_bytes_per_rank(trainer.model, trainer.optimizer)}


def config_record(cfg) -> dict[str, Any]:
    """The config as ``metrics.json`` records it, as plain JSON values: TRL's ``to_dict()`` (a plain dataclass's
    fields for the stages that are not TRL configs) without ``logging_dir`` (where TensorBoard logs go, not how the
    model was trained)."""
    config = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
    config.pop("logging_dir", None)
    return json.loads(json.dumps(config, default=str))


# The top-level keys of every stage's metrics.json, in one schema (docs/architecture.md, "What a stage writes"):
#   stage        the stage kind that wrote it ("dpo", "ppo", ...);
#   metrics      the final numbers, namespaced ("train/loss", "eval/kl", "reward/accuracy", "memory/...") - what
#                run() returns and what the pipeline, the quickstart and the model card read;
#   data         a DataReport per data source ("train", "eval", "pairs"): rows used, dropped or cut, and why;
#   run          facts about the run that are not metrics (processes, the reference, the reward model's layout,
#                its mean / std, the closing evaluation's error, ...);
#   controller   the controller's final state and decisions (None without a controller);
#   log_history  the trainer's logs, the training curves ([] for a stage that trains nothing);
#   config       the config the stage ran with.
METRICS_SCHEMA = ("stage", "metrics", "data", "run", "controller", "log_history", "config")


def write_stage_metrics(out: Path, stage: str, metrics: dict[str, Any], config: dict[str, Any], *, trainer=None,
                        data: dict[str, DataReport] | None = None, run: dict[str, Any] | None = None,
                        log_history: list[dict[str, Any]] | None = None, error: Exception | None = None) -> None:
    """A stage's metrics.json (:data:`METRICS_SCHEMA`), written last: it marks the stage finished (for a pipeline).

    ``trainer`` (a stage that trains) gives ``log_history``, the controller's report and, in ``run``, the processes
    it ran on. ``error`` is the closing evaluation's failure (the model is saved all the same), recorded in ``run``
    as ``evaluation_error``."""
    from rlhf_lm.controller import controller_report

    run = dict(run or {})
    controller = None
    if trainer is not None:
        run.update(num_processes=trainer.accelerator.num_processes,
                   distributed_type=str(trainer.accelerator.distributed_type))
        controller, log_history = controller_report(trainer), trainer.state.log_history
    if error is not None:
        run["evaluation_error"] = describe(error)
    write_json(out / METRICS_FILE, {
        "stage": stage, "metrics": metrics, "data": {name: report.as_dict() for name, report in (data or {}).items()},
        "run": run, "controller": controller, "log_history": list(log_history or []), "config": config,
    })


def log_history_recorder(into: list):
    """A TrainerCallback that copies the trainer's log history (the training curves) into ``into`` at the end: for
    the pipeline, of a stage that does not save it itself, and for a stage whose trainer is not its own (the task's
    base-policy pre-training). (transformers is imported when it is built, so importing the pipeline stays light.)"""
    from transformers import TrainerCallback

    class LogHistoryRecorder(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            into[:] = list(state.log_history)

    return LogHistoryRecorder()


def closing_eval_prompts(source: str | None, split: str, column: str, hh_messages: bool, data_path: str | None,
                         held_out: Callable[[], list[Any]], limit: int | None = None) -> tuple[list[Any], str | None]:
    """The held-out prompts a closing evaluation samples on, and the prompt source read (None: ``held_out()``).

    In order: ``source`` (a prompt file, directory or dataset, its ``split``); else the built-in task's
    ``prompts_eval.jsonl`` when the training data ``data_path`` comes from a task dir; else ``held_out()``, the
    training run's own held-out prompts. Only the first ``limit`` are kept when it is set.
    """
    source = source if source is not None else task_eval_prompts(data_path)
    if source is not None:
        prompts = normalize_prompts(load_rows(source, split), column, hh_messages)[0]["prompt"]
    else:
        prompts = held_out()
    return (prompts[:limit] if limit else prompts), source
