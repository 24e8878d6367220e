"""Read raw rows from a Hub dataset id, a local .json / .jsonl (also .gz) / .parquet / .csv file (or a directory of
them), or an in-memory ``datasets.Dataset``, with every unreadable byte, line or row named precisely."""

from __future__ import annotations

import gzip
import json
import logging
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from rlhf_lm.data.rows import Rows
from rlhf_lm.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")


# Raised while reading a damaged gzip stream: truncated (EOFError), not gzip or a bad CRC (BadGzipFile), corrupt
# deflate data (zlib.error).
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a local text file, gunzipped for .gz; a damaged gzip stream or an unreadable file
    is a DataError naming the last line read. Lines are decoded by the caller (see :func:`_decode`)."""
    lineno = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, raw
    except GZIP_ERRORS as e:
        where = f"after line {lineno}" if lineno else "before the first line"
        raise DataError(f"{path}: the gzip data is damaged {where} ({e or type(e).__name__}); the file is truncated "
                        "or corrupt. Re-create or re-download it.") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e}).") from None


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    """One line as text, with the byte that is not UTF-8 named (a BOM at the start of the file is dropped)."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}, byte {e.start + 1}: not valid UTF-8 (byte 0x{raw[e.start]:02x}: "
                        f"{e.reason}). Save the file as UTF-8.") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}). Fix or remove that line.") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read.") from None


def _read_json_lines(path: Path) -> Rows:
    # Parsed by hand (not datasets' JSON builder) so a malformed line is reported as file:line.
    rows, lines = [], []
    for lineno, raw in _raw_lines(path):
        line = _decode(raw, path, lineno)
        if not line.strip():
            continue
        row = _parse_json(line, f"{path}:{lineno}")
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}.")
        rows.append(row)
        lines.append(lineno)
    if not rows:
        raise DataError(f"{path} has no rows.")
    return Rows(_from_list(rows, str(path), lines), str(path), lines)


def _read_json(path: Path) -> Rows:
    text = "".join(_decode(raw, path, lineno) for lineno, raw in _raw_lines(path))
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return _read_json_lines(path)  # many ".json" files are really JSON Lines
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of objects (or one key holding one), got keys {list(data)}.")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects.")
    if not data:
        raise DataError(f"{path} has no rows.")
    return Rows(_from_list(data, str(path)), str(path))


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _from_list(rows: list[dict], source: str, lines: list[int] | None = None) -> Dataset:
    """Build a Dataset from JSON rows: the union of all keys (missing = None), one type per column.

    ``Dataset.from_list`` takes its columns from the first row and raises an opaque Arrow error on a type clash, so
    both are checked here, naming the row that breaks the pattern.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row))
    first_kind: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows):
        for key, value in row.items():
            kind = _kind(value)
            if kind == "null":
                continue
            seen = first_kind.setdefault(key, (kind, i))
            if seen[0] != kind:
                where = f"{source}:{lines[i]}" if lines else f"{source} row {i + 1}"
                first = f"line {lines[seen[1]]}" if lines else f"row {seen[1] + 1}"
                raise DataError(f"{where}, column '{key}': got {kind}, but {first} has {seen[0]}. Give each column "
                                "one type.")
    try:
        return Dataset.from_list([{key: row.get(key) for key in columns} for row in rows])
    except Exception as e:  # nested structures that Arrow still cannot unify
        raise DataError(f"{source}: rows do not share one schema ({e}). Check that each column has one type.") from e


def _read_local_file(path: Path) -> Rows:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_json_lines(path)
    if name.endswith((".json", ".json.gz")):
        return _read_json(path)
    from datasets import load_dataset

    kind = "parquet" if name.endswith(".parquet") else "csv" if name.endswith(".csv") else None
    if kind is None:
        raise DataError(f"{path}: unsupported file type. Use one of {', '.join(LOCAL_SUFFIXES)}.")
    try:
        with _quiet_datasets():
            ds = load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:
        cause = e.__cause__ or e.__context__ or e  # datasets wraps the reader's error (with its line) in its own
        if kind == "csv" and isinstance(cause, UnicodeDecodeError):
            for lineno, raw in _raw_lines(path):  # the decoder said which byte of the file, not which line
                _decode(raw, path, lineno)
        raise DataError(f"{path}: could not read as {kind}: {type(cause).__name__}: {cause}") from e
    return Rows(ds, str(path))


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs a reader's failure at ERROR level before raising it; we report it ourselves, in one line."""
    from datasets.utils import logging as datasets_logging

    level = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(level)


def load_rows(source: str | os.PathLike | Dataset | DatasetDict, split: str = "train",
              config: str | None = None) -> Rows:
    """Read raw rows from a Dataset, a local file or directory, or a Hub dataset id (``split`` picks the split)."""
    if isinstance(source, DatasetDict):
        if split not in source:
            raise DataError(f"The dataset has no split '{split}'; splits found: {list(source)}.")
        source = source[split]
    if isinstance(source, Dataset):
        return Rows(source, "the in-memory dataset")
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        return _read_local_file(path)
    if path.is_dir():
        all_files = sorted(p for p in path.iterdir() if p.name.lower().endswith(LOCAL_SUFFIXES))
        if not all_files:
            raise DataError(f"{path} holds no data files ({', '.join(LOCAL_SUFFIXES)}).")
        files = [p for p in all_files if split in p.name]
        if not files and split != "train":  # a named held-out split must never quietly become all the data
            raise DataError(f"{path} has no file for split '{split}' (a file whose name contains it); files found: "
                            f"{[p.name for p in all_files]}.")
        files = files or all_files  # a directory of unnamed files is one 'train' split
        if len(files) == 1:
            return _read_local_file(files[0])
        parts = [_read_local_file(f) for f in files]
        from datasets import concatenate_datasets

        return Rows(concatenate_datasets([p.dataset for p in parts]), str(path))
    if str(source).startswith((".", "/", "~")) or str(source).lower().endswith(LOCAL_SUFFIXES):
        raise DataError(f"Dataset file not found: {source}.")
    return _load_hub(str(source), split, config)


def _load_hub(name: str, split: str, config: str | None) -> Rows:
    from datasets import load_dataset

    try:
        return Rows(load_dataset(name, config, split=split), f"{name}[{split}]")
    except Exception as e:
        raise DataError(f"Could not load dataset '{name}' (split '{split}') from the Hub or a local path: {e}. "
                        "Offline? Point dataset_name at a local .jsonl/.parquet/.csv file.") from e
