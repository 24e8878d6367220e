"""Secrets never reach a file we write: configs, metrics, pipeline records, checkpoints, logs or model cards.

Two layers, because a secret can travel by name or by value:

* by name - a config field or JSON key that names a credential (``hub_token``, ``token``, ``wandb_api_key``, ...;
  not tokenizer fields such as ``eos_token`` or ``max_new_tokens``) is written as ``<redacted>``;
* by value - every secret we have seen (a token given in a recipe or flag, ``HF_TOKEN`` in the environment) is
  replaced wherever it appears in text we write or log.

``hub_token`` itself is taken out of the stage config before any trainer sees it (transformers pickles the whole
config into ``training_args.bin`` with every checkpoint and full-model save) and handed to ``huggingface_hub``
through ``HF_TOKEN``, which is where it reads a token from when the config has none.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

REDACTED = "<redacted>"
SECRET_NAME = re.compile(r"token|secret|passw|api_?key|credential", re.IGNORECASE)
# Tokenizer and length fields that contain "token" but hold no secret.
NOT_SECRET_NAME = re.compile(r"^(eos|pad|bos|unk|sep|cls|mask)_token$|tokens|tokeniz|token_ids?$|_token_id",
                             re.IGNORECASE)
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
_MIN_SECRET_LEN = 8  # shorter values would redact ordinary words
_seen: set[str] = set()


def is_secret_key(name: str) -> bool:
    """Whether a config field / JSON key names a credential."""
    return bool(SECRET_NAME.search(name)) and not NOT_SECRET_NAME.search(name)


def remember(value: Any) -> None:
    """Record a secret value so it is scrubbed from everything written or logged in this process."""
    if isinstance(value, str) and len(value) >= _MIN_SECRET_LEN:
        _seen.add(value)


def known_secrets() -> set[str]:
    env = {os.environ.get(name) for name in SECRET_ENV}
    return _seen | {v for v in env if v and len(v) >= _MIN_SECRET_LEN}


def scrub_text(text: str) -> str:
    for secret in sorted(known_secrets(), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, strings) with secret-named values and known secret values replaced."""
    if isinstance(obj, dict):
        return {k: REDACTED if isinstance(k, str) and is_secret_key(k) and isinstance(v, str) and v
                else redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return scrub_text(obj)
    return obj


def take_hub_token(cfg: Any) -> None:
    """Move ``cfg.hub_token`` into ``HF_TOKEN`` (huggingface_hub reads it from there) and out of the config, and
    remember every secret-named string field of ``cfg`` for scrubbing."""
    for f in dataclasses.fields(cfg):
        if is_secret_key(f.name):
            remember(getattr(cfg, f.name, None))
    token = getattr(cfg, "hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token  # an explicit flag or recipe key wins over the environment, as flags do
        cfg.hub_token = None


class ScrubSecrets(logging.Filter):
    """A logging filter that replaces known secret values in every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if known_secrets():
            message = record.getMessage()
            clean = scrub_text(message)
            if clean != message:
                record.msg, record.args = clean, ()
        return True
