"""The text a reward classifier scores, laid out exactly as TRL's RewardTrainer lays out training pairs, and the
fitting of preference pairs to ``max_length`` in that same layout.

``prompt + completion + eos`` for plain text, the chat template over ``prompt + [assistant reply]`` for
conversations. Scoring at inference with any other layout would silently shift the rewards.
"""

from __future__ import annotations

from typing import Any

from rlhf_lm.errors import DataError


def reward_text(prompt: Any, completion: Any, tokenizer) -> str:
    """The text a reward classifier scores, laid out exactly as TRL's RewardTrainer lays out training pairs."""
    if isinstance(prompt, list):  # conversational: chat template over the prompt turns + the reply
        reply = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    text = prompt + completion
    eos = tokenizer.eos_token
    return text if text.endswith(eos) else text + eos


def reward_input_ids(prompt: Any, completion: Any, tokenizer) -> list[int]:
    """Token ids of :func:`reward_text`, with special tokens added as TRL adds them (plain text only: a chat template
    already writes its own)."""
    text = reward_text(prompt, completion, tokenizer)
    return tokenizer(text, add_special_tokens=not isinstance(prompt, list))["input_ids"]


def fit_pairs_to_length(ds, tokenizer, max_length: int, report, mode: str = "truncate_prompt"):
    """Make every pair fit ``max_length`` tokens as the reward model is trained on it (:func:`reward_input_ids`);
    every pair that is cut or dropped is counted in ``report`` (TRL's RewardTrainer drops longer pairs silently).

    ``mode="truncate_prompt"`` drops a conversation's earliest turns (a system message stays) or cuts a text prompt
    from the left until the longer of its two sides fits, so the last turns - what the responses answer - are kept;
    only pairs whose response does not fit even after the last user turn are dropped. ``mode="drop"`` drops every
    pair over ``max_length``.
    """
    def length(prompt, completion) -> int:
        return len(reward_input_ids(prompt, completion, tokenizer))

    def fits(prompt, row) -> bool:
        return max(length(prompt, row["chosen"]), length(prompt, row["rejected"])) <= max_length

    kept, cut = [], 0
    for row in ds:
        prompt = row["prompt"]
        if not fits(prompt, row):
            prompt = _shorter_prompt(prompt, row, fits, tokenizer) if mode == "truncate_prompt" else None
            if prompt is None:
                report.drop(f"pair over max_length={max_length}" if mode == "drop"
                            else f"response does not fit max_length={max_length} even after the last user turn")
                continue
            cut += 1
        kept.append({**row, "prompt": prompt})
    if cut:
        report.truncated[f"prompt cut from the left to fit max_length={max_length}"] += cut
    report.rows_out = len(kept)
    if not kept:
        raise DataError(f"No pair of {report.source} fits max_length={max_length} ({report.summary()}). Raise "
                        "max_length or shorten the data.")
    from datasets import Dataset

    return Dataset.from_list(kept)


def _shorter_prompt(prompt: Any, row: dict, fits, tokenizer) -> Any:
    """The longest tail of ``prompt`` with which ``row`` fits (see :func:`fit_pairs_to_length`), or None."""
    if isinstance(prompt, list):
        head = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
        turns = prompt[len(head):]
        for start in range(1, len(turns)):
            if turns[start]["role"] == "user" and fits(head + turns[start:], row):
                return head + turns[start:]
        return None
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for keep in range(len(ids) - 1, 0, -max(1, len(ids) // 16)):  # a few re-tokenizations, not one per token
        tail = tokenizer.decode(ids[-keep:])
        if fits(tail, row):
            return tail
    return None
