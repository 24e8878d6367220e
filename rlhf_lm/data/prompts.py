"""Prompt-only rows for PPO / GRPO / RLOO: a ``prompt`` string or message list, or the prompt of an HH-RLHF
dialogue; duplicates dropped and counted."""

from __future__ import annotations

import json

from datasets import Dataset

from rlhf_lm.data.hh_rlhf import ASSISTANT_TAG, hh_dialogue_messages, split_hh_dialogue, split_hh_messages
from rlhf_lm.data.report import DataReport
from rlhf_lm.data.rows import Rows, check_text, is_messages
from rlhf_lm.errors import DataError


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
        check_text(value, rows, i, column)
        if isinstance(value, str) and ASSISTANT_TAG in value and column != prompt_column:
            # an HH dialogue: prompt = up to the last assistant turn
            split = split_hh_messages(value) if hh_messages else split_hh_dialogue(value)
            if split is None:
                raise DataError(f"{rows.where(i)}, column '{column}': an HH-RLHF dialogue without a final "
                                "'\\n\\nAssistant:' turn.")
            value = split[0]
        elif isinstance(value, str) and hh_messages and value.rstrip().endswith(ASSISTANT_TAG.strip()) and \
                (turns := hh_dialogue_messages(value)):
            # an HH prompt ("...\n\nAssistant:") in the prompt column: its turns as messages, like the pairs', without
            # the empty assistant turn it ends on
            value = turns[:-1]
        elif is_messages(value) and value[-1]["role"] == "assistant":
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
