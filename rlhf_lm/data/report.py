"""What happened to a dataset on the way in: rows read, rows kept, and every drop (and truncation) by reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


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
