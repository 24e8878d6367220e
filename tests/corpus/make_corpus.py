"""Regenerate the bad data files of the corpus (the binary ones cannot be written by hand): ``python make_corpus.py``.

Every file is a small, valid preference or prompt file damaged in one way a user's file gets damaged: a gzip
stream cut short by an interrupted download, text saved as Latin-1 or UTF-16, a line of broken JSON, ...
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

HERE = Path(__file__).parent / "data"
PAIRS = [{"prompt": f"Describe the cat and the dog ({i}).", "chosen": "the cat is happy .",
          "rejected": "a cold rain ."} for i in range(120)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def main() -> None:
    HERE.mkdir(exist_ok=True)
    good = jsonl(PAIRS)
    (HERE / "good.jsonl").write_bytes(good)
    (HERE / "prompts.jsonl").write_bytes(jsonl([{"prompt": r["prompt"]} for r in PAIRS]))
    compressed = gzip.compress(good, mtime=0)
    (HERE / "truncated.jsonl.gz").write_bytes(compressed[: len(compressed) // 2])  # an interrupted download
    (HERE / "not_gzip.jsonl.gz").write_bytes(good)  # plain text with a .gz name
    (HERE / "truncated.json.gz").write_bytes(gzip.compress(json.dumps(PAIRS).encode(), mtime=0)[:200])
    flipped = bytearray(compressed)
    flipped[len(flipped) // 2] ^= 0xFF  # one bit-rotted byte in the deflate stream
    (HERE / "corrupt.jsonl.gz").write_bytes(bytes(flipped))
    latin1 = {"prompt": "Un café, s'il vous plaît ?", "chosen": "Voilà.", "rejected": "Non."}
    (HERE / "latin1.jsonl").write_bytes(jsonl(PAIRS[:2]) + (json.dumps(latin1, ensure_ascii=False) + "\n")
                                        .encode("latin-1"))
    (HERE / "utf16.jsonl").write_bytes(good.decode().encode("utf-16"))
    (HERE / "latin1.csv").write_bytes("prompt,chosen,rejected\nHello?,Hi.,Go.\nUn café ?,Voilà.,Non.\n"
                                      .encode("latin-1"))
    (HERE / "corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4)
    lines = good.splitlines(keepends=True)
    (HERE / "malformed.jsonl").write_bytes(b"".join(lines[:2]) + b'{"prompt": "Q", "chosen": "A",\n')
    (HERE / "not_objects.jsonl").write_bytes(lines[0] + b'["prompt", "chosen", "rejected"]\n')
    (HERE / "type_clash.jsonl").write_bytes(lines[0] + jsonl([{"prompt": "Q", "chosen": 4, "rejected": "B"}]))
    (HERE / "wrong_type.jsonl").write_bytes(jsonl([{"prompt": "Q", "chosen": ["A"], "rejected": "B"}]))
    (HERE / "missing_column.jsonl").write_bytes(jsonl([{"prompt": r["prompt"], "chosen": r["chosen"]}
                                                       for r in PAIRS[:3]]))
    (HERE / "empty.jsonl").write_bytes(b"\n\n")


if __name__ == "__main__":
    main()
