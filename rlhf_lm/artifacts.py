"""Output directories that a run cannot corrupt, and which checkpoint a run resumes from.

Output directories (:func:`check_output_dir`, :func:`staged_output`):

Output directories (:func:`check_output_dir`, :func:`staged_output`):

* A stage writes into ``<output_dir>.partial`` and moves it into place only when it finishes. A crash (or Ctrl-C)
  leaves an existing ``output_dir`` untouched, and leaves the partial directory - with its checkpoints - for
  ``resume_from_checkpoint`` to pick up.
* ``output_dir`` may be missing, empty, or a finished rlhf-lm output (it holds :data:`OUTPUT_MARKER`, which lists the
  files the run wrote). A finished output is replaced only with ``overwrite_output_dir: true``, and only when it
  holds nothing but those files. Any other existing directory is refused: a run never deletes or overwrites data it
  did not create. The replaced output is moved aside under a unique hidden name of our own, so no sibling folder
  (``run.old``, ...) is ever touched.
* A partial directory with complete checkpoints is never discarded silently: without ``resume_from_checkpoint`` the
  run stops and says how to resume (or to start over with ``overwrite_output_dir``).

Checkpoints are written atomically (:mod:`rlhf_lm.checkpoints`); a resumed run takes the newest complete one in the
partial directory and logs which (:func:`resolve_resume`).

All checks run on every process and change nothing; only the main process creates, clears and moves directories.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf_lm.checkpoints import (
    CHECKPOINT_STAGING,
    TRAINER_STATE,
    is_complete_checkpoint,
    is_resume_state,
    last_checkpoint,
    numbered_checkpoints,
)
from rlhf_lm.errors import ArtifactError
from rlhf_lm.json_files import read_json_object, write_json

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
OUTPUT_MARKER = ".rlhf_lm_output.json"  # what this directory is: {"state": "partial" | "finished", "stage", ...}
_FALSE = (None, False, "", "false", "False", "no")
_active: list[Path] = []  # partial dirs of runs started in this process and not finished (for the Ctrl-C message)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def output_path(output_dir: str | os.PathLike) -> Path:
    """``output_dir`` as an absolute path (``.``, ``..`` and trailing slashes resolved), refusing the root."""
    path = Path(os.path.abspath(os.path.expanduser(str(output_dir))))
    if not path.name:
        raise ArtifactError(f"output_dir {output_dir} is the filesystem root; choose a folder for the run's output.")
    return path


def partial_dir(output_dir: str | os.PathLike) -> Path:
    final = output_path(output_dir)
    return final.with_name(final.name + ".partial")


def wants_resume(resume: Any) -> bool:
    return resume not in _FALSE


# -------------------------------------------------------------------------------------------------- markers
def read_marker(directory: Path) -> dict[str, Any] | None:
    return read_json_object(directory / OUTPUT_MARKER)


def _legacy_marker(directory: Path) -> dict[str, Any] | None:
    """A finished output written before markers existed: its metrics.json records this very output_dir."""
    config = (read_json_object(directory / METRICS_FILE) or {}).get("config")
    if isinstance(config, dict) and Path(str(config.get("output_dir", ""))).name == directory.name:
        return {"state": "finished", "stage": "an earlier", "files": None}
    return None


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir())


def _entries(directory: Path) -> list[str]:
    try:
        return sorted(p.name for p in directory.iterdir())
    except OSError as e:
        raise ArtifactError(f"Cannot read {directory}: {e.strerror}.") from None


def _foreign_files(directory: Path, marker: dict[str, Any]) -> list[str]:
    """Files in a finished output that the run did not write (a user's notes, ...): replacing it would lose them."""
    if marker.get("files") is None:  # a legacy output: no list of its files to compare with
        return []
    written = set(marker["files"]) | {OUTPUT_MARKER}
    return [f for f in _files(directory) if f not in written and not is_resume_state(f)]


# ------------------------------------------------------------------------------------------------- resuming
def incomplete_checkpoints(directory: str | os.PathLike) -> list[str]:
    """Checkpoints that a kill interrupted while they were being written."""
    directory = Path(directory)
    torn = [p.name for _, p in numbered_checkpoints(directory) if not is_complete_checkpoint(p)]
    staging = directory / CHECKPOINT_STAGING
    return torn + ([f"{CHECKPOINT_STAGING}/{n}" for n in _entries(staging)] if staging.is_dir() else [])


def resolve_resume(output_dir: str | os.PathLike, resume: Any) -> str | None:
    """The checkpoint to resume from: for ``true`` the newest complete one in ``<output_dir>.partial`` (logged, with
    any incomplete ones it skipped), for a path that checkpoint; None to start from scratch (resume not asked for).

    ``true`` with no complete checkpoint is an error in every stage, as in transformers' Trainer (``No valid
    checkpoint found``): a run asked to continue must not quietly start over."""
    if not wants_resume(resume):
        return None
    if str(resume).lower() != "true":
        if not is_complete_checkpoint(resume):
            raise ArtifactError(f"resume_from_checkpoint {resume} is not a complete checkpoint (a checkpoint-N folder "
                                f"with {TRAINER_STATE}). Use --resume_from_checkpoint true for the newest complete one.")
        logger.info("Resuming from %s.", resume)
        return str(resume)
    partial = partial_dir(output_dir)
    found = last_checkpoint(partial)
    skipped = incomplete_checkpoints(partial)
    if skipped:
        logger.warning("Skipping incomplete checkpoint(s) %s in %s: the run was stopped while writing them.",
                       skipped, partial)
    if found is None:
        raise ArtifactError(f"resume_from_checkpoint is true, but {partial} holds no complete checkpoint of a run "
                            f"of output_dir {output_dir} to resume from. Leave resume_from_checkpoint out to start "
                            "the run from the beginning.")
    logger.info("Resuming from %s (the newest complete checkpoint in %s).", found, partial)
    return found


# ---------------------------------------------------------------------------------------- output directories
def check_output_dir(output_dir: str | os.PathLike, *, overwrite: bool = False, resume: Any = None) -> None:
    """Raise an ArtifactError, before anything is loaded, if this run may not write ``output_dir``. Changes nothing."""
    final = output_path(output_dir)
    if final.exists() and not final.is_dir():
        raise ArtifactError(f"output_dir {output_dir} exists and is not a directory; choose another output_dir.")
    if final.is_dir() and (entries := _entries(final)):
        marker = read_marker(final) or _legacy_marker(final)
        if marker is None or marker.get("state") != "finished":
            raise ArtifactError(f"output_dir {output_dir} already exists and is not a finished rlhf-lm output (it "
                                f"holds {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); a run never "
                                "writes into or deletes a folder it did not create. Choose a new output_dir.")
        if not overwrite:
            raise ArtifactError(f"output_dir {output_dir} holds a finished {marker.get('stage', 'rlhf-lm')} run. To "
                                "replace it set overwrite_output_dir: true (--overwrite_output_dir true; in a pipeline "
                                "--force <stage>), or choose another output_dir.")
        foreign = _foreign_files(final, marker)
        if foreign:
            raise ArtifactError(f"output_dir {output_dir} holds a finished run plus files it did not write "
                                f"({', '.join(foreign[:3])}); move them out before replacing it.")
    partial = final.with_name(final.name + ".partial")
    if partial.exists() and not partial.is_dir():
        raise ArtifactError(f"{partial} exists and is not a directory; a run of {output_dir} needs that name for its "
                            "work in progress. Move it away.")
    if partial.is_dir() and _entries(partial) and read_marker(partial) is None:
        raise ArtifactError(f"{partial} exists but was not created by an rlhf-lm run of {output_dir} (no "
                            f"{OUTPUT_MARKER}); move it away or delete it.")
    checkpoint = last_checkpoint(partial)
    if checkpoint and not wants_resume(resume) and not overwrite:
        raise ArtifactError(f"{partial} holds checkpoints of an unfinished run (newest complete: "
                            f"{Path(checkpoint).name}). Resume it with --resume_from_checkpoint true (in a pipeline "
                            "--<stage>.resume_from_checkpoint true), or start over with --overwrite_output_dir true.")
    if wants_resume(resume) and str(resume).lower() != "true" and not is_complete_checkpoint(resume):
        raise ArtifactError(f"resume_from_checkpoint {resume} is not a complete checkpoint (a checkpoint-N folder "
                            f"with {TRAINER_STATE}). Use --resume_from_checkpoint true for the newest complete one.")
    _check_writable(partial)


def _check_writable(path: Path) -> None:
    """Fail now, not after the model has loaded, when ``path`` cannot be created."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"Cannot create {path}: {parent} is not a directory. Choose another output_dir.")
    try:  # a real write: permission bits do not tell the whole story (root, read-only mounts, ACLs)
        with tempfile.TemporaryDirectory(dir=parent, prefix=".rlhf_lm-write-test-"):
            pass
    except OSError as e:
        raise ArtifactError(f"Cannot create {path}: {parent} is not writable ({e.strerror}). Choose an output_dir in "
                            "a folder you can write to.") from None


def _prepare_partial(partial: Path, stage: str, resume: Any) -> None:
    """Create the partial dir, keeping its checkpoints when resuming from them and clearing our own leftovers
    otherwise (check_output_dir has made sure they are ours and hold nothing to resume)."""
    try:
        if partial.is_dir():
            if wants_resume(resume) and last_checkpoint(partial):
                shutil.rmtree(partial / CHECKPOINT_STAGING, ignore_errors=True)  # torn saves: never resumed from
            elif _entries(partial):
                logger.info("Removing %s: leftovers of an earlier run that left nothing to resume from.", partial)
                shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        write_json(partial / OUTPUT_MARKER, {"state": "partial", "stage": stage, "started": time.time()})
    except OSError as e:
        raise ArtifactError(f"Cannot create {partial}: {e.strerror}. Choose an output_dir in a folder you can write "
                            "to.") from None


def _finish(partial: Path, final: Path, stage: str, drop_checkpoints: bool = False) -> None:
    """Mark the partial dir finished and move it to ``final``, replacing a finished output only as checked.

    ``drop_checkpoints`` removes the resume state only once the output is in place: a kill at any moment before
    leaves the last checkpoint to resume from (one after leaves checkpoint folders in the output, nothing worse).
    """
    shutil.rmtree(partial / CHECKPOINT_STAGING, ignore_errors=True)
    files = [f for f in _files(partial) if f != OUTPUT_MARKER and not (drop_checkpoints and is_resume_state(f))]
    write_json(partial / OUTPUT_MARKER, {"state": "finished", "stage": stage, "finished": time.time(), "files": files})
    if final.is_dir() and _entries(final):
        marker = read_marker(final) or _legacy_marker(final)
        if marker is None or marker.get("state") != "finished" or _foreign_files(final, marker):
            raise ArtifactError(f"{final} changed while this run was going and now holds data it did not write; "
                                f"the finished result is kept in {partial}.")
        aside = final.with_name(f".{final.name}.replaced-{uuid.uuid4().hex[:8]}")  # our own name: no sibling touched
        final.rename(aside)
        partial.rename(final)
        shutil.rmtree(aside, ignore_errors=True)
        logger.info("Replaced the earlier %s output in %s.", marker.get("stage", ""), final)
    else:
        if final.is_dir():
            final.rmdir()  # empty: nothing to keep
        partial.rename(final)
    if drop_checkpoints:
        for _, checkpoint in numbered_checkpoints(final):  # the finished artifact needs no resume state
            shutil.rmtree(checkpoint, ignore_errors=True)


@contextmanager
def staged_output(output_dir: str | os.PathLike, *, stage: str = "stage", overwrite: bool = False,
                  resume: Any = None, drop_checkpoints: bool = False) -> Iterator[Path]:
    """Yield the staging directory ``<output_dir>.partial``; on success move it to ``output_dir``.

    ``overwrite`` allows replacing a finished output; ``resume`` (the config's resume_from_checkpoint) keeps the
    partial dir's checkpoints; ``drop_checkpoints`` leaves them out of the finished output. On other processes than
    the main one this only yields the path.
    """
    final = output_path(output_dir)
    partial = final.with_name(final.name + ".partial")
    if not _is_main_process():
        yield partial
        return
    check_output_dir(output_dir, overwrite=overwrite, resume=resume)
    _prepare_partial(partial, stage, resume)
    _active.append(partial)
    try:
        yield partial
    except BaseException:  # the partial dir stays for resuming - unless nothing was written into it yet
        if set(_entries(partial)) <= {OUTPUT_MARKER}:
            shutil.rmtree(partial, ignore_errors=True)
            _active.remove(partial)
        raise
    _finish(partial, final, stage, drop_checkpoints)
    _active.remove(partial)


def interrupted_run() -> tuple[Path, str | None] | None:
    """(partial dir, newest complete checkpoint) of the run this process was writing when it stopped, if any."""
    if not _active:
        return None
    return _active[-1], last_checkpoint(_active[-1])
