"""Load preference and prompt datasets, normalise them to TRL's format, and validate with row-precise errors.

Sources: a Hub dataset id, a local .json / .jsonl (also .gz) / .parquet / .csv file (or a directory of them), or
an in-memory ``datasets.Dataset``. Preference rows are normalised to ``prompt`` / ``chosen`` / ``rejected``, either
plain text or conversational (lists of ``{"role", "content"}`` messages), from these formats:

==================  ========================================================================================
hh_rlhf             ``chosen`` / ``rejected`` are whole dialogues; prompt = up to the last "\\n\\nAssistant:"
explicit            ``prompt`` / ``chosen`` / ``rejected`` strings
conversational      ``chosen`` / ``rejected`` message lists (``prompt`` optional: the shared leading turns)
ultrafeedback       one ``prompt`` and several scored ``completions`` -> best vs a random lower-scored one
shp                 ``history`` + ``human_ref_A`` / ``human_ref_B`` + ``labels`` (or ``score_A`` / ``score_B``)
prompt_only         ``prompt`` (string or messages) for PPO / GRPO / RLOO
==================  ========================================================================================

Nothing is dropped silently: every dropped row is counted by reason in a :class:`DataReport`, and a dataset left
empty is an error that says why.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from rlhf_lm.errors import DataError

logger = logging.getLogger(__name__)

PREFERENCE_FORMATS = ("auto", "hh_rlhf", "explicit", "conversational", "ultrafeedback", "shp")
ASSISTANT_TAG = "\n\nAssistant:"
LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")


@dataclass
class DataReport:
    """What happened to a dataset on the way in: rows read, rows kept, and every drop by reason."""

    source: str
    rows_in: int = 0
    rows_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: Counter = field(default_factory=Counter)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def summary(self) -> str:
        parts = [f"{self.source}: kept {self.rows_out} of {self.rows_in} rows"]
        parts += [f"dropped {n} ({reason})" for reason, n in sorted(self.dropped.items())]
        parts += [f"truncated {n} ({reason})" for reason, n in sorted(self.truncated.items())]
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "dropped": dict(self.dropped),
                "truncated": dict(self.truncated)}


# ------------------------------------------------------------------------------------------------ reading rows
class Rows:
    """A loaded dataset plus how to name a row in an error message (file:line for JSON Lines, else row N)."""

    def __init__(self, dataset: Dataset, source: str, lines: list[int] | None = None):
        self.dataset, self.source, self.lines = dataset, source, lines

    def where(self, i: int) -> str:
        if self.lines is not None:
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source} row {i + 1}"


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


# ------------------------------------------------------------------------------------------- row validation
def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _check_text(value: Any, rows: Rows, i: int, column: str, allow_messages: bool = True) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{rows.where(i)}, column '{column}': the text is empty. Remove the row or fill it in.")
        return
    if allow_messages and _is_messages(value):
        if not value or not any(str(m["content"]).strip() for m in value):
            raise DataError(f"{rows.where(i)}, column '{column}': the message list is empty.")
        return
    expected = "a string or a list of {role, content} messages" if allow_messages else "a string"
    raise DataError(f"{rows.where(i)}, column '{column}': expected {expected}, got {type(value).__name__} "
                    f"({str(value)[:60]!r}).")


def _require_columns(rows: Rows, columns: list[str], fmt: str, hint: str = "") -> None:
    found = rows.dataset.column_names
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataError(
            f"{rows.source}: missing column(s) {missing} for format '{fmt}'; columns found: {found}. "
            f"{hint or 'Set prompt_column / chosen_column / rejected_column, or data_format, in the recipe.'}"
        )


# ------------------------------------------------------------------------------------------- format detection
def detect_format(columns: list[str], first_row: dict[str, Any], prompt_col: str = "prompt",
                  chosen_col: str = "chosen", rejected_col: str = "rejected") -> str:
    """Guess the preference format from the columns (and the first row's types)."""
    cols = set(columns)
    if {chosen_col, rejected_col} <= cols:
        if _is_messages(first_row.get(chosen_col)):
            return "conversational"
        if prompt_col in cols:
            return "explicit"
        return "hh_rlhf"
    if {"human_ref_A", "human_ref_B"} <= cols:
        return "shp"
    if prompt_col in cols and ({"completions", "responses"} & cols):
        return "ultrafeedback"
    raise DataError(
        f"Cannot tell the preference format from columns {sorted(cols)}. Set data_format to one of "
        f"{', '.join(PREFERENCE_FORMATS[1:])} and the column names (prompt_column, chosen_column, rejected_column)."
    )


# ---------------------------------------------------------------------------------------------- normalisers
def split_hh_dialogue(text: str) -> tuple[str, str] | None:
    """Split an HH-RLHF dialogue into (prompt, response) at the last "\\n\\nAssistant:" (None if it has none)."""
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT_TAG)
    return text[:end], text[end:]


HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_dialogue_messages(text: str) -> list[dict[str, str]] | None:
    """An HH-RLHF dialogue as chat messages (Human -> user, Assistant -> assistant), or None if it has no turns.

    Consecutive turns of one speaker (a few rows have them) are joined, since chat templates expect the roles to
    alternate; a turn's surrounding whitespace is dropped, as a chat template adds its own.
    """
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    messages: list[dict[str, str]] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role, content = HH_ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def _split_hh_messages(text: str) -> tuple[list[dict], list[dict]] | None:
    """(prompt messages, [final assistant message]) of an HH dialogue, or None without a final assistant turn."""
    messages = hh_dialogue_messages(text)
    if not messages or messages[-1]["role"] != "assistant" or len(messages) < 2:
        return None
    return messages[:-1], messages[-1:]


def _hh_rlhf(rows: Rows, cols: dict, report: DataReport, rng: random.Random, as_messages: bool = False):
    _require_columns(rows, [cols["chosen"], cols["rejected"]], "hh_rlhf")
    split = _split_hh_messages if as_messages else split_hh_dialogue
    for i, row in enumerate(rows.dataset):
        chosen, rejected = row[cols["chosen"]], row[cols["rejected"]]
        _check_text(chosen, rows, i, cols["chosen"], allow_messages=False)
        _check_text(rejected, rows, i, cols["rejected"], allow_messages=False)
        c, r = split(chosen), split(rejected)
        if c is None or r is None:
            raise DataError(f"{rows.where(i)}: no '\\n\\nAssistant:' turn in the dialogue; is this HH-RLHF data? "
                            "Set data_format to match your rows.")
        if c[0] != r[0]:
            report.drop("chosen and rejected continue different prompts")
            continue
        if as_messages and not (c[1][0]["content"] and r[1][0]["content"]):
            report.drop("empty response")
            continue
        yield {"prompt": c[0], "chosen": c[1], "rejected": r[1]}


def _explicit(rows: Rows, cols: dict, report: DataReport, rng: random.Random):
    _require_columns(rows, [cols["prompt"], cols["chosen"], cols["rejected"]], "explicit")
    for i, row in enumerate(rows.dataset):
        for key in ("prompt", "chosen", "rejected"):
            _check_text(row[cols[key]], rows, i, cols[key])
        pair = {"prompt": row[cols["prompt"]], "chosen": row[cols["chosen"]], "rejected": row[cols["rejected"]]}
        if "margin" in row:  # optional per-pair margin, used by the reward model's Bradley-Terry loss
            if not isinstance(row["margin"], (int, float)) or isinstance(row["margin"], bool):
                raise DataError(f"{rows.where(i)}, column 'margin': expected a number, got {row['margin']!r}.")
            pair["margin"] = float(row["margin"])
        yield pair


def _conversational(rows: Rows, cols: dict, report: DataReport, rng: random.Random):
    _require_columns(rows, [cols["chosen"], cols["rejected"]], "conversational")
    has_prompt = cols["prompt"] in rows.dataset.column_names
    for i, row in enumerate(rows.dataset):
        chosen, rejected = row[cols["chosen"]], row[cols["rejected"]]
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not _is_messages(value):
                raise DataError(f"{rows.where(i)}, column '{cols[key]}': expected a list of {{role, content}} "
                                f"messages, got {type(value).__name__}.")
        if has_prompt and row[cols["prompt"]]:
            prompt = row[cols["prompt"]]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            n = len(prompt)
            # UltraFeedback-binarized repeats the prompt inside chosen/rejected; keep only the replies.
            if chosen[:n] == prompt and rejected[:n] == prompt:
                chosen, rejected = chosen[n:], rejected[n:]
        else:
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt or not chosen or not rejected:
            raise DataError(f"{rows.where(i)}: cannot find a shared prompt and a final reply in the message lists.")
        yield {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _completion_items(row: dict) -> list[tuple[Any, float]]:
    if "completions" in row and row["completions"] is not None:
        items = []
        for c in row["completions"]:
            text = next((c[k] for k in ("response", "text", "completion") if k in c), None)
            score = next((c[k] for k in ("overall_score", "score", "rating") if k in c and c[k] is not None), None)
            items.append((text, score))
        return items
    return list(zip(row.get("responses") or [], row.get("scores") or []))


def _ultrafeedback(rows: Rows, cols: dict, report: DataReport, rng: random.Random):
    _require_columns(rows, [cols["prompt"]], "ultrafeedback")
    for i, row in enumerate(rows.dataset):
        _check_text(row[cols["prompt"]], rows, i, cols["prompt"])
        items = _completion_items(row)
        if any(s is None or t is None for t, s in items):
            raise DataError(f"{rows.where(i)}: every completion needs a text and a score (keys response/text and "
                            "overall_score/score/rating, or parallel 'responses' and 'scores' lists).")
        items = [(t, float(s)) for t, s in items if isinstance(t, str) and t.strip()]
        if len(items) < 2:
            report.drop("fewer than two usable completions")
            continue
        best = max(items, key=lambda x: x[1])
        worse = [t for t, s in items if s < best[1]]
        if not worse:
            report.drop("all completions tie on score")
            continue
        yield {"prompt": row[cols["prompt"]], "chosen": best[0], "rejected": rng.choice(worse)}


def _shp(rows: Rows, cols: dict, report: DataReport, rng: random.Random):
    prompt_col = "history" if "history" in rows.dataset.column_names else cols["prompt"]
    _require_columns(rows, [prompt_col, "human_ref_A", "human_ref_B"], "shp")
    has_labels = "labels" in rows.dataset.column_names
    for i, row in enumerate(rows.dataset):
        a, b = row["human_ref_A"], row["human_ref_B"]
        _check_text(row[prompt_col], rows, i, prompt_col)
        if has_labels and row["labels"] is not None:
            a_wins = int(row["labels"]) == 1
        else:
            sa, sb = row.get("score_A"), row.get("score_B")
            if sa is None or sb is None:
                raise DataError(f"{rows.where(i)}: SHP rows need 'labels' or both 'score_A' and 'score_B'.")
            if sa == sb:
                report.drop("tie")
                continue
            a_wins = sa > sb
        _check_text(a, rows, i, "human_ref_A")
        _check_text(b, rows, i, "human_ref_B")
        yield {"prompt": row[prompt_col], "chosen": a if a_wins else b, "rejected": b if a_wins else a}


NORMALISERS: dict[str, Callable] = {"hh_rlhf": _hh_rlhf, "explicit": _explicit, "conversational": _conversational,
                                    "ultrafeedback": _ultrafeedback, "shp": _shp}


def normalize_preferences(rows: Rows, data_format: str = "auto", prompt_column: str = "prompt",
                          chosen_column: str = "chosen", rejected_column: str = "rejected",
                          seed: int = 0, hh_messages: bool = False) -> tuple[Dataset, DataReport]:
    """Turn raw rows into prompt / chosen / rejected, dropping (and counting) pairs with chosen == rejected.

    ``hh_messages``: HH-RLHF dialogues become chat messages (every earlier turn kept) instead of raw text."""
    if data_format not in PREFERENCE_FORMATS:
        raise DataError(f"Unknown data_format '{data_format}'; choose one of {', '.join(PREFERENCE_FORMATS)}.")
    ds = rows.dataset
    if data_format == "auto":
        data_format = detect_format(ds.column_names, ds[0] if len(ds) else {}, prompt_column, chosen_column,
                                    rejected_column)
    report = DataReport(source=rows.source, rows_in=len(ds))
    cols = {"prompt": prompt_column, "chosen": chosen_column, "rejected": rejected_column}
    out = []
    normaliser = partial(_hh_rlhf, as_messages=True) if data_format == "hh_rlhf" and hh_messages \
        else NORMALISERS[data_format]
    for pair in normaliser(rows, cols, report, random.Random(seed)):
        if pair["chosen"] == pair["rejected"]:
            report.drop("chosen == rejected")
            continue
        out.append(pair)
    report.rows_out = len(out)
    if not out:
        raise DataError(f"No usable preference pairs left in {rows.source} ({report.summary()}).")
    return Dataset.from_list(out), report


def normalize_prompts(rows: Rows, prompt_column: str = "prompt", hh_messages: bool = False) -> tuple[Dataset, DataReport]:
    """Prompt-only rows for PPO / GRPO / RLOO: a ``prompt`` string or message list, or an HH-RLHF dialogue (as chat
    messages with ``hh_messages``)."""
    ds = rows.dataset
    report = DataReport(source=rows.source, rows_in=len(ds))
    column = prompt_column if prompt_column in ds.column_names else None
    if column is None:
        for alt in ("messages", "chosen", "question", "instruction"):
            if alt in ds.column_names:
                column = alt
                break
    if column is None:
        raise DataError(f"{rows.source}: no prompt column '{prompt_column}'; columns found: {ds.column_names}. "
                        "Set prompt_column in the recipe.")
    prompts, seen = [], set()
    for i, row in enumerate(ds):
        value = row[column]
        _check_text(value, rows, i, column)
        if isinstance(value, str) and ASSISTANT_TAG in value and column != prompt_column:
            # an HH dialogue: prompt = up to the last assistant turn
            split = _split_hh_messages(value) if hh_messages else split_hh_dialogue(value)
            if split is None:
                raise DataError(f"{rows.where(i)}, column '{column}': an HH-RLHF dialogue without a final "
                                "'\\n\\nAssistant:' turn.")
            value = split[0]
        elif isinstance(value, str) and hh_messages and value.rstrip().endswith(ASSISTANT_TAG.strip()) and \
                (turns := hh_dialogue_messages(value)):
            # an HH prompt ("...\n\nAssistant:") in the prompt column: its turns as messages, like the pairs', without
            # the empty assistant turn it ends on
            value = turns[:-1]
        elif _is_messages(value) and value[-1]["role"] == "assistant":
            value = value[:-1]
        key = json.dumps(value)
        if key in seen:
            report.drop("duplicate prompt")
            continue
        seen.add(key)
        prompts.append({"prompt": value})
    report.rows_out = len(prompts)
    if not prompts:
        raise DataError(f"No usable prompts in {rows.source} ({report.summary()}).")
    return Dataset.from_list(prompts), report


# ------------------------------------------------------------------------------------------------ splitting
def train_eval_split(ds: Dataset, eval_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Deterministic split by seed; ``eval_fraction == 0`` gives no eval set."""
    if eval_fraction <= 0:
        return ds, None
    n_eval = max(1, int(round(len(ds) * eval_fraction)))
    if n_eval >= len(ds):
        raise DataError(f"eval_fraction={eval_fraction} leaves no training rows out of {len(ds)}.")
    split = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]


def hh_as_messages(args, tokenizer=None) -> bool:
    """Whether HH-RLHF dialogues become chat messages: ``hh_format`` 'messages', or 'auto' with a tokenizer that has
    a chat template (an instruct model is then trained on HH in its own chat format)."""
    hh_format = getattr(args, "hh_format", "text")
    if hh_format == "auto":
        return getattr(tokenizer, "chat_template", None) is not None
    return hh_format == "messages"


DEFAULT_EVAL_FRACTION = 0.1


def _naming_source(rows: Rows, normalize: Callable, *args):
    """``normalize(rows, *args)``, with a DataError that does not say which data it is about prefixed with the
    source (e.g. a format that cannot be detected from the columns)."""
    try:
        return normalize(rows, *args)
    except DataError as e:
        if rows.source in str(e):
            raise
        raise DataError(f"{rows.source}: {e}") from e


def held_out_split(args) -> tuple[str | None, float]:
    """(eval split name, eval fraction) the held-out data comes from, refusing an eval split a source cannot have.

    A single file (or an in-memory Dataset) is one split: a ``dataset_eval_split`` on it would read the training
    rows again and call them held out. That is an error - unless ``eval_fraction`` is set, which then holds out that
    fraction of the file instead (and says so).
    """
    fraction = args.eval_fraction
    source = args.dataset_name
    single = isinstance(source, Dataset) or (isinstance(source, (str, os.PathLike))
                                             and Path(os.path.expanduser(str(source))).is_file())
    if not args.dataset_eval_split or not single:
        return args.dataset_eval_split, DEFAULT_EVAL_FRACTION if fraction is None else fraction
    name = "the in-memory dataset" if isinstance(source, Dataset) else str(source)
    if fraction:
        logger.warning("dataset_eval_split '%s' ignored: %s is a single file with no such split; holding out "
                       "eval_fraction=%s of it instead.", args.dataset_eval_split, name, fraction)
        return None, fraction
    raise DataError(f"dataset_eval_split '{args.dataset_eval_split}' names no held-out data in {name}: a single file "
                    "is one split, so evaluation would reuse the training rows. Point dataset_name at a directory or "
                    "Hub dataset that has that split, or set eval_fraction (e.g. 0.1) to hold out part of the file.")


def load_preference_data(args, seed: int = 0, tokenizer=None) -> tuple[Dataset, Dataset | None, DataReport]:
    """Train / eval preference datasets from ``DataArguments`` (or any object with the same fields). ``tokenizer``
    (the model's) decides ``hh_format: auto``."""
    if not args.dataset_name:
        raise DataError("No dataset given: set dataset_name (a local file, a directory, or a Hub dataset id).")
    eval_split, eval_fraction = held_out_split(args)
    rows = load_rows(args.dataset_name, args.dataset_train_split, args.dataset_config)
    hh_messages = hh_as_messages(args, tokenizer)
    train, report = _naming_source(rows, normalize_preferences, args.data_format, args.prompt_column,
                                   args.chosen_column, args.rejected_column, seed, hh_messages)
    if eval_split:
        eval_rows = load_rows(args.dataset_name, eval_split, args.dataset_config)
        eval_ds, eval_report = _naming_source(eval_rows, normalize_preferences, args.data_format, args.prompt_column,
                                              args.chosen_column, args.rejected_column, seed, hh_messages)
        report.dropped.update({f"eval: {k}": v for k, v in eval_report.dropped.items()})
    else:
        train, eval_ds = train_eval_split(train, eval_fraction, seed)
    train = _take(train, args.max_train_samples, report)
    eval_ds = _take(eval_ds, args.max_eval_samples)
    logger.info(report.summary())
    return train, eval_ds, report


def load_prompt_data(args, seed: int = 0, tokenizer=None) -> tuple[Dataset, Dataset | None, DataReport]:
    """Train / eval prompt datasets from ``DataArguments``; ``tokenizer`` decides ``hh_format: auto``."""
    if not args.dataset_name:
        raise DataError("No prompt dataset given: set dataset_name (a local file, a directory, or a Hub id).")
    eval_split, eval_fraction = held_out_split(args)
    rows = load_rows(args.dataset_name, args.dataset_train_split, args.dataset_config)
    hh_messages = hh_as_messages(args, tokenizer)
    train, report = _naming_source(rows, normalize_prompts, args.prompt_column, hh_messages)
    if eval_split:
        eval_ds, _ = _naming_source(load_rows(args.dataset_name, eval_split, args.dataset_config), normalize_prompts,
                                    args.prompt_column, hh_messages)
        eval_ds = _without_training_prompts(eval_ds, train, report, eval_split)
    else:
        train, eval_ds = train_eval_split(train, eval_fraction, seed)
    return _take(train, args.max_train_samples, report), _take(eval_ds, args.max_eval_samples), report


def _without_training_prompts(eval_ds: Dataset, train: Dataset, report: DataReport, split: str) -> Dataset:
    """Held-out prompts that also occur in training measure memory, not generalisation: drop and count them."""
    seen = {json.dumps(p) for p in train["prompt"]}
    keep = [i for i, p in enumerate(eval_ds["prompt"]) if json.dumps(p) not in seen]
    if len(keep) < len(eval_ds):
        report.drop(f"eval: held-out prompt also in the training data ({split})", len(eval_ds) - len(keep))
    if not keep:
        raise DataError(f"Every prompt of the held-out split '{split}' also occurs in the training split; give "
                        "dataset_eval_split prompts the policy is not trained on.")
    return eval_ds.select(keep)


def unseen_prompts(held_out: Dataset | None, train: Dataset) -> list[Any]:
    """The distinct prompts of ``held_out`` rows that no ``train`` row has, in their first-seen order."""
    if held_out is None:
        return []
    seen = {json.dumps(p) for p in train["prompt"]}
    out = []
    for prompt in held_out["prompt"]:
        key = json.dumps(prompt)
        if key not in seen:
            seen.add(key)
            out.append(prompt)
    return out


def held_out_prompts(args, seed: int = 0, tokenizer=None) -> list[Any]:
    """The prompts a run held out of its training data (its eval split, or its eval_fraction share), none of them a
    training prompt: the default prompts to judge a policy on, given the data arguments it was trained with."""
    if getattr(args, "data_format", None) == "prompt_only":
        _, eval_ds, _ = load_prompt_data(args, seed, tokenizer)  # already de-duplicated against training
        return list(eval_ds["prompt"]) if eval_ds is not None else []
    train, eval_ds, _ = load_preference_data(args, seed, tokenizer)
    return unseen_prompts(eval_ds, train)


def _take(ds: Dataset | None, n: int | None, report: DataReport | None = None) -> Dataset | None:
    """The first ``n`` rows; with a ``report``, the rows left out are counted, so its numbers add up to the rows read
    and the later drops (length limits) read against the rows actually used."""
    if ds is None or not n or n >= len(ds):
        return ds
    if report is not None:
        report.drop(f"beyond max_train_samples={n}", len(ds) - n)
        report.rows_out = n
    return ds.select(range(n))


# --------------------------------------------------------------------------------------------- length control
def _text_of(value: Any, tokenizer) -> str:
    if isinstance(value, str):
        return value
    return tokenizer.apply_chat_template(value, tokenize=False)


def filter_by_length(ds: Dataset, tokenizer, max_length: int, report: DataReport, max_prompt_length: int | None = None,
                     mode: str = "drop") -> Dataset:
    """Count, then drop (``mode="drop"``) or keep for truncation (``mode="truncate"``), pairs over ``max_length``.

    TRL's trainers drop or truncate over-long pairs silently; doing the count here makes every loss of data visible.
    A prompt that alone fills ``max_prompt_length`` (default ``max_length``) is always dropped: no response would fit.
    """
    if mode not in ("drop", "truncate"):
        raise DataError(f"Unknown length mode '{mode}': use drop or truncate.")
    max_prompt = max_prompt_length or max_length

    def lengths(batch):
        out = {"_prompt_len": [], "_pair_len": []}
        for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            lp = len(tokenizer(_text_of(p, tokenizer))["input_ids"])
            lc = len(tokenizer(_text_of(c, tokenizer))["input_ids"])
            lr = len(tokenizer(_text_of(r, tokenizer))["input_ids"])
            out["_prompt_len"].append(lp)
            out["_pair_len"].append(lp + max(lc, lr))
        return out

    measured = ds.map(lengths, batched=True)
    prompt_too_long = sum(1 for n in measured["_prompt_len"] if n >= max_prompt)
    over = sum(1 for p, n in zip(measured["_prompt_len"], measured["_pair_len"]) if p < max_prompt and n > max_length)
    if prompt_too_long:
        report.drop(f"prompt alone has >= {max_prompt} tokens", prompt_too_long)
    if over and mode == "drop":
        report.drop(f"pair over max_length={max_length}", over)
    elif over:
        report.truncated[f"pair over max_length={max_length}"] += over
    keep = [i for i, (p, n) in enumerate(zip(measured["_prompt_len"], measured["_pair_len"]))
            if p < max_prompt and (mode == "truncate" or n <= max_length)]
    report.rows_out = len(keep)
    if not keep:
        raise DataError(f"Every pair in {report.source} is longer than max_length={max_length} "
                        f"({report.summary()}). Raise max_length or shorten the data.")
    return ds.select(keep)
