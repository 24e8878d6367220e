"""Preference formats: normalise raw rows to ``prompt`` / ``chosen`` / ``rejected``, either plain text or
conversational (lists of ``{"role", "content"}`` messages), from these formats:

==================  ========================================================================================
hh_rlhf             ``chosen`` / ``rejected`` are whole dialogues; prompt = up to the last "\\n\\nAssistant:"
explicit            ``prompt`` / ``chosen`` / ``rejected`` strings
conversational      ``chosen`` / ``rejected`` message lists (``prompt`` optional: the shared leading turns)
ultrafeedback       one ``prompt`` and several scored ``completions`` -> best vs a random lower-scored one
shp                 ``history`` + ``human_ref_A`` / ``human_ref_B`` + ``labels`` (or ``score_A`` / ``score_B``)
==================  ========================================================================================

Prompt-only rows (PPO / GRPO / RLOO) are read by :mod:`rlhf_lm.data.prompts`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from typing import Any

from datasets import Dataset

from rlhf_lm.data.hh_rlhf import split_hh_dialogue, split_hh_messages
from rlhf_lm.data.report import DataReport
from rlhf_lm.data.rows import Rows, check_text, is_messages, require_columns
from rlhf_lm.errors import DataError

PREFERENCE_FORMATS = ("auto", "hh_rlhf", "explicit", "conversational", "ultrafeedback", "shp")


def detect_format(columns: list[str], first_row: dict[str, Any], prompt_col: str = "prompt",
                  chosen_col: str = "chosen", rejected_col: str = "rejected") -> str:
    """Guess the preference format from the columns (and the first row's types)."""
    cols = set(columns)
    if {chosen_col, rejected_col} <= cols:
        if is_messages(first_row.get(chosen_col)):
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


def _hh_rlhf(rows: Rows, cols: dict, report: DataReport, rng: random.Random, as_messages: bool = False):
    require_columns(rows, [cols["chosen"], cols["rejected"]], "hh_rlhf")
    split = split_hh_messages if as_messages else split_hh_dialogue
    for i, row in enumerate(rows.dataset):
        chosen, rejected = row[cols["chosen"]], row[cols["rejected"]]
        check_text(chosen, rows, i, cols["chosen"], allow_messages=False)
        check_text(rejected, rows, i, cols["rejected"], allow_messages=False)
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
    require_columns(rows, [cols["prompt"], cols["chosen"], cols["rejected"]], "explicit")
    for i, row in enumerate(rows.dataset):
        for key in ("prompt", "chosen", "rejected"):
            check_text(row[cols[key]], rows, i, cols[key])
        pair = {"prompt": row[cols["prompt"]], "chosen": row[cols["chosen"]], "rejected": row[cols["rejected"]]}
        if "margin" in row:  # optional per-pair margin, used by the reward model's Bradley-Terry loss
            if not isinstance(row["margin"], (int, float)) or isinstance(row["margin"], bool):
                raise DataError(f"{rows.where(i)}, column 'margin': expected a number, got {row['margin']!r}.")
            pair["margin"] = float(row["margin"])
        yield pair


def _conversational(rows: Rows, cols: dict, report: DataReport, rng: random.Random):
    require_columns(rows, [cols["chosen"], cols["rejected"]], "conversational")
    has_prompt = cols["prompt"] in rows.dataset.column_names
    for i, row in enumerate(rows.dataset):
        chosen, rejected = row[cols["chosen"]], row[cols["rejected"]]
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not is_messages(value):
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
    require_columns(rows, [cols["prompt"]], "ultrafeedback")
    for i, row in enumerate(rows.dataset):
        check_text(row[cols["prompt"]], rows, i, cols["prompt"])
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
    require_columns(rows, [prompt_col, "human_ref_A", "human_ref_B"], "shp")
    has_labels = "labels" in rows.dataset.column_names
    for i, row in enumerate(rows.dataset):
        a, b = row["human_ref_A"], row["human_ref_B"]
        check_text(row[prompt_col], rows, i, prompt_col)
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
        check_text(a, rows, i, "human_ref_A")
        check_text(b, rows, i, "human_ref_B")
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
