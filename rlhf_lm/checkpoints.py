"""Checkpoints that are complete or absent.

Checkpoints are written under :data:`CHECKPOINT_STAGING` and renamed to ``checkpoint-N`` when complete
(:class:`AtomicCheckpoints` for transformers' Trainer, :func:`publish_checkpoint` for our PPO trainer), so a kill
during a save leaves no torn ``checkpoint-N``; resume picks the newest complete one and logs which
(:func:`rlhf_lm.artifacts.resolve_resume`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from rlhf_lm.json_files import read_json_object

logger = logging.getLogger(__name__)

CHECKPOINT_STAGING = ".checkpoint-in-progress"  # checkpoints being written, renamed to checkpoint-N when complete
TRAINER_STATE = "trainer_state.json"  # written by transformers' Trainer and our PPO trainer into every checkpoint
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def is_resume_state(relative: str) -> bool:
    """A file of a checkpoint (or of one being written): the run's own resume state."""
    top = relative.split("/")[0]
    return top == CHECKPOINT_STAGING or bool(_CHECKPOINT_NAME.match(top))


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """A ``checkpoint-N`` folder whose trainer state (written last by every trainer we use) is there and readable."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    path = Path(path)
    if not (_CHECKPOINT_NAME.match(path.name) and path.is_dir()):
        return False
    return read_json_object(path / TRAINER_STATE) is not None


def numbered_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def last_checkpoint(directory: str | os.PathLike) -> str | None:
    """The newest *complete* ``checkpoint-N`` folder under ``directory``, or None. Torn ones (a kill during a save
    by an older version, or by a trainer that writes in place) are skipped."""
    complete = [p for _, p in numbered_checkpoints(Path(directory)) if is_complete_checkpoint(p)]
    return str(complete[-1]) if complete else None


def publish_checkpoint(staged: Path, output_dir: str | os.PathLike) -> Path:
    """Move a fully written checkpoint from the staging folder to ``output_dir/checkpoint-N`` (one rename)."""
    final = Path(output_dir) / staged.name
    old = None
    if final.exists():  # the same step saved again: swap, so a complete checkpoint-N exists at every moment
        old = staged.with_name(f"{staged.name}.replaced-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    staged.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def staging_checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where checkpoint ``step`` is written before :func:`publish_checkpoint` renames it into place."""
    return Path(output_dir) / CHECKPOINT_STAGING / f"checkpoint-{step}"


class AtomicCheckpoints:
    """Trainer mixin for crash-safe checkpoints.

    * Every checkpoint is written under :data:`CHECKPOINT_STAGING` and renamed to ``checkpoint-N`` once every process
      has written its part, so a kill during a save never leaves a torn ``checkpoint-N``. transformers' Trainer
      writes in place (model, then optimizer, RNG and trainer state); here its own save runs unchanged, pointed at
      the staging folder through ``_get_output_dir``, its only source of the run directory.
    * Resuming from the checkpoint that ended training (a kill after the last step) loads it and trains no more:
      transformers' loop checks ``max_steps`` only after a step, so it would train one step too many.
    """

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, (str, os.PathLike)) and is_complete_checkpoint(resume_from_checkpoint):
            saved = json.loads((Path(resume_from_checkpoint) / TRAINER_STATE).read_text())
            last = self.args.max_steps if self.args.max_steps > 0 else saved.get("max_steps", 0)
            if last and saved.get("global_step", 0) >= last:
                return self._load_finished_training(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_finished_training(self, checkpoint: str):
        from transformers.trainer_callback import TrainerState
        from transformers.trainer_utils import TrainOutput

        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))
        logger.info("%s is the end of training (step %d): loaded, nothing left to train.", checkpoint,
                    self.state.global_step)
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        losses = [h["loss"] for h in self.state.log_history if "loss" in h]
        return TrainOutput(self.state.global_step, sum(losses) / len(losses) if losses else float("nan"),
                           {"train_runtime": 0.0})

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        staged = staging_checkpoint_dir(run_dir, self.state.global_step)
        self._get_output_dir = lambda trial=None: str(staged.parent)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staged.parent:  # transformers recorded the staging path: point it home
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
        self.accelerator.wait_for_everyone()  # every process has written its RNG state into the staged folder
        if self.args.should_save:
            if self.state.best_model_checkpoint != best:
                self.state.save_to_json(str(staged / TRAINER_STATE))
            publish_checkpoint(staged, run_dir)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()
