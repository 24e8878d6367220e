"""Property-based fuzzing of the data loaders: valid files, damaged at random (truncation, byte flips and
insertions, wrong value types, missing and renamed columns, other encodings), go through every loader - preference
data and prompt data - in every local format. Each must come back as our DataError (one clear line) or as a valid
dataset; nothing else (no raw EOFError, UnicodeDecodeError, ArrowInvalid, TypeError, ...).

``derandomize=True`` makes the examples the same on every run (a fixed seed: no flaky CI); 6 formats x 200
examples = 1,200 damaged files per run, each read by both loaders.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_lm.configs import DataArguments
from rlhf_lm.data import load_preference_data, load_prompt_data
from rlhf_lm.errors import DataError

EXAMPLES_PER_FORMAT = 200
FORMATS = ("jsonl", "jsonl.gz", "json", "json.gz", "csv", "parquet")
SEEDS = {
    "explicit": [{"prompt": f"Décris le chat n°{i} ?", "chosen": "the cat is happy .", "rejected": "a cold rain ."}
                 for i in range(4)],
    "hh_rlhf": [{"chosen": f"\n\nHuman: Hi {i}\n\nAssistant: Hello, glad to help.",
                 "rejected": f"\n\nHuman: Hi {i}\n\nAssistant: Go away."} for i in range(4)],
    "conversational": [{"chosen": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "Hello"}],
                        "rejected": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": "No"}]}
                       for i in range(4)],
    "ultrafeedback": [{"prompt": f"Write a haiku {i}", "completions": [{"response": "a", "overall_score": 3.0},
                                                                        {"response": "b", "overall_score": 8.0}]}
                      for i in range(4)],
    "prompts": [{"prompt": f"Tell me about the rain ({i})."} for i in range(4)],
}
# Column names the format detection and the normalisers look at: renaming onto them exercises every format.
COLUMNS = ("prompt", "chosen", "rejected", "completions", "responses", "scores", "history", "human_ref_A",
           "human_ref_B", "labels", "score_A", "score_B", "messages", "question", "margin", "role", "content")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(COLUMNS + ("response", "text")),
                                                                  inner, max_size=3),
    max_leaves=6)


@st.composite
def damaged_rows(draw) -> list[dict]:
    """Rows of one format with 0-3 row-level mistakes: a value of the wrong type, a column missing or renamed."""
    rows = [dict(r) for r in draw(st.sampled_from(list(SEEDS.values())))]
    for _ in range(draw(st.integers(0, 3))):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        kind = draw(st.sampled_from(("wrong_type", "missing", "rename", "empty")))
        key = draw(st.sampled_from(sorted(row))) if row else "prompt"
        if kind == "wrong_type":
            row[key] = draw(json_values)
        elif kind == "missing":
            row.pop(key, None)
        elif kind == "rename" and key in row:
            row[draw(st.sampled_from(COLUMNS))] = row.pop(key)
        else:
            row[key] = ""
    return rows


def serialise(rows: list[dict], fmt: str, encoding: str) -> bytes:
    """The rows as a file of format ``fmt`` (text formats in ``encoding``); rows Parquet cannot hold become a
    file that is not Parquet at all (also a case to survive)."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        try:
            pq.write_table(pa.Table.from_pylist(rows), buffer)
        except (pa.ArrowException, ValueError, TypeError, OverflowError):
            return serialise(rows, "jsonl", "utf-8")
        return buffer.getvalue()
    if fmt.startswith("jsonl"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif fmt.startswith("json"):
        text = json.dumps(rows, ensure_ascii=False)
    else:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows)
        text = out.getvalue()
    data = text.encode(encoding, errors="replace")
    return gzip.compress(data, mtime=0) if fmt.endswith(".gz") else data


@st.composite
def damaged_file(draw, fmt: str) -> bytes:
    encoding = draw(st.sampled_from(("utf-8", "utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16")))
    data = bytearray(serialise(draw(damaged_rows()), fmt, encoding))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(("none", "truncate", "flip", "insert", "delete")))
        if not data or kind == "none":
            continue
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[at:at + draw(st.integers(1, 8))]
    return bytes(data)


def assert_valid(ds, columns: tuple[str, ...]) -> None:
    assert len(ds) > 0 and set(columns) <= set(ds.column_names)
    for row in ds:
        for column in columns:
            value = row[column]
            if isinstance(value, str):
                assert value.strip()
            else:  # a conversation: a list of {role, content} messages
                assert isinstance(value, list) and all({"role", "content"} <= set(m) for m in value)


def read_with_every_loader(path: Path) -> list[str]:
    """Each loader's outcome: 'ok' (a valid dataset) or 'error' (our DataError). Anything else propagates."""
    outcomes = []
    args = DataArguments(dataset_name=str(path), eval_fraction=0.0)
    for load, columns in ((load_preference_data, ("prompt", "chosen", "rejected")), (load_prompt_data, ("prompt",))):
        try:
            train, _, _ = load(args)
        except DataError as e:
            assert path.name in str(e), f"the error does not name the file: {e}"
            outcomes.append("error")
            continue
        assert_valid(train, columns)
        outcomes.append("ok")
    return outcomes


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    """datasets' CSV / Parquet builders cache every file they read: keep the fuzzed ones out of the user's cache
    (and their progress bars out of the test log)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    yield
    if not bars_were_off:
        datasets.enable_progress_bars()


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_files_give_a_data_error_or_a_valid_dataset(fmt, tmp_path):
    seen: list[list[str]] = []
    path = tmp_path / f"data.{fmt}"

    @settings(max_examples=EXAMPLES_PER_FORMAT, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=damaged_file(fmt))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        seen.append(read_with_every_loader(path))

    check()
    assert len(seen) >= EXAMPLES_PER_FORMAT  # every example ran (and none raised anything but DataError)
    outcomes = {o for pair in seen for o in pair}
    assert outcomes == {"ok", "error"}, f"{fmt}: the fuzzer only produced {outcomes}"
