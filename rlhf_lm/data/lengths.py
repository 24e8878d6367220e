"""The one length filter: pairs over ``max_length`` counted, then dropped or kept for truncation."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from rlhf_lm.data.report import DataReport
from rlhf_lm.errors import DataError


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
