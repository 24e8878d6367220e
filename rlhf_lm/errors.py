"""Errors a user can act on.

Every mistake we can detect (bad config key, malformed data row, a reward spec that points nowhere, ...) raises a
subclass of :class:`RlhfError`. The CLI prints these as one clear message, without a stack trace from deep inside
TRL; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import traceback
from collections.abc import Iterable
from pathlib import Path


class RlhfError(Exception):
    """Base class: a problem with the user's input or setup, with a message that says what to do."""


class ConfigError(RlhfError, ValueError):
    """A recipe or CLI flag is invalid (unknown key, bad value, incompatible options)."""


class DataError(RlhfError, ValueError):
    """A dataset is missing, malformed or empty after filtering; the message names file, row and column."""


class RewardError(RlhfError, ValueError):
    """A reward spec cannot be loaded, or a reward model returned something unusable (wrong shape, NaN)."""


class ArtifactError(RlhfError, FileNotFoundError):
    """A stage's input artifact (model, adapter, reward model, checkpoint) is missing or incomplete, or its output
    directory cannot be written without losing data it did not create."""


class EvaluationError(RlhfError, RuntimeError):
    """The closing evaluation of a stage failed after training; the trained model is saved and the message says how
    to re-run only the evaluation."""


class HubError(RlhfError, ConnectionError):
    """The Hugging Face Hub cannot be reached (offline, wrong HF_ENDPOINT) or refused the request."""


def describe(error: BaseException) -> str:
    """An exception as one line: our own errors by their message; anything else (e.g. raised by a user's reward
    model) by its type, message and the innermost frame, so the line says where it came from."""
    if isinstance(error, RlhfError):
        return str(error)
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}{where}: {error}"


def closest_spelling(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice spelled most like ``name`` (difflib's similarity ratio at least ``cutoff``), or None."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return match[0] if match else None


def did_you_mean(guess: str | None) -> str:
    """The hint an "unknown name" message ends with, `` Did you mean 'x'?``, or nothing when there is no guess: one
    wording for every such error."""
    return f" Did you mean '{guess}'?" if guess else ""


def suggest(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """:func:`did_you_mean` for the closest spelling of ``name`` among ``choices`` (empty when none is close)."""
    return did_you_mean(closest_spelling(name, choices, cutoff))
