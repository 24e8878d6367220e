"""Output directories that a failed run cannot corrupt, and the small JSON files stages hand to each other.

A stage writes into ``<output_dir>.partial`` and only swaps it into place when it finishes. A crash (or Ctrl-C)
leaves an existing ``output_dir`` untouched, and leaves the partial directory - with the Trainer's checkpoints -
for ``resume_from_checkpoint`` to pick up.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlhf_lm.errors import ArtifactError

METRICS_FILE = "metrics.json"


def partial_dir(output_dir: str | Path) -> Path:
    final = Path(output_dir)
    return final.with_name(final.name + ".partial")


@contextmanager
def staged_output(output_dir: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a staging directory; on success move it to ``output_dir`` (replacing the old one only then)."""
    final = Path(output_dir)
    if final.exists() and not final.is_dir():
        raise ArtifactError(f"output_dir {final} exists and is not a directory.")
    if not overwrite and final.exists() and any(final.iterdir()):
        raise ArtifactError(f"output_dir {final} already holds results. Choose another output_dir or allow "
                            "overwriting.")
    stage = partial_dir(final)
    stage.mkdir(parents=True, exist_ok=True)
    yield stage
    if final.exists():
        backup = final.with_name(final.name + ".old")
        shutil.rmtree(backup, ignore_errors=True)
        final.rename(backup)
        stage.rename(final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        stage.rename(final)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"Expected {path}; the stage that should have written it did not finish.")
    return json.loads(path.read_text())


def last_checkpoint(directory: str | Path) -> str | None:
    """The newest ``checkpoint-N`` folder under ``directory`` (Trainer's layout), or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = [(int(p.name.split("-")[-1]), p) for p in directory.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return str(max(steps)[1]) if steps else None
