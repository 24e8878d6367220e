"""The small JSON files stages hand to each other (metrics.json, markers, trainer states): written atomically with
secrets redacted, read strictly (a stage's result) or leniently (a file that may not be there yet)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlhf_lm.errors import ArtifactError
from rlhf_lm.redaction import redact


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically, with secrets redacted (see :mod:`rlhf_lm.redaction`)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(redact(data), indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when the file is missing, unreadable or holds anything else: for files
    that may not be there yet (a marker, a trainer state being written) or that only add detail (a model card's
    metrics), where a gap is not an error."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError: bad JSON or bad UTF-8
        return None
    return data if isinstance(data, dict) else None


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"Expected {path}; the stage that should have written it did not finish.")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the stage that wrote it did not finish cleanly. "
                            "Re-run that stage.") from None
