"""A loaded dataset that can name its rows (file:line or row N), and the checks of a row's values that use it."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from rlhf_lm.errors import DataError


class Rows:
    """A loaded dataset plus how to name a row in an error message (file:line for JSON Lines, else row N)."""

    def __init__(self, dataset: Dataset, source: str, lines: list[int] | None = None):
        self.dataset, self.source, self.lines = dataset, source, lines

    def where(self, i: int) -> str:
        if self.lines is not None:
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source} row {i + 1}"


def is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def check_text(value: Any, rows: Rows, i: int, column: str, allow_messages: bool = True) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{rows.where(i)}, column '{column}': the text is empty. Remove the row or fill it in.")
        return
    if allow_messages and is_messages(value):
        if not value or not any(str(m["content"]).strip() for m in value):
            raise DataError(f"{rows.where(i)}, column '{column}': the message list is empty.")
        return
    expected = "a string or a list of {role, content} messages" if allow_messages else "a string"
    raise DataError(f"{rows.where(i)}, column '{column}': expected {expected}, got {type(value).__name__} "
                    f"({str(value)[:60]!r}).")


def require_columns(rows: Rows, columns: list[str], fmt: str, hint: str = "") -> None:
    found = rows.dataset.column_names
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataError(
            f"{rows.source}: missing column(s) {missing} for format '{fmt}'; columns found: {found}. "
            f"{hint or 'Set prompt_column / chosen_column / rejected_column, or data_format, in the recipe.'}"
        )
