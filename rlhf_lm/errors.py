"""Errors a user can act on.

Every mistake we can detect (bad config key, malformed data row, a reward spec that points nowhere, ...) raises a
subclass of :class:`RlhfError`. The CLI prints these as one clear message, without a stack trace from deep inside
TRL; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RlhfError(Exception):
    """Base class: a problem with the user's input or setup, with a message that says what to do."""


class ConfigError(RlhfError, ValueError):
    """A recipe or CLI flag is invalid (unknown key, bad value, incompatible options)."""


class DataError(RlhfError, ValueError):
    """A dataset is missing, malformed or empty after filtering; the message names file, row and column."""


class RewardError(RlhfError, ValueError):
    """A reward spec cannot be loaded, or a reward model returned something unusable (wrong shape, NaN)."""


class ArtifactError(RlhfError, FileNotFoundError):
    """A stage's input artifact (model, adapter, reward model, checkpoint) is missing or incomplete."""
