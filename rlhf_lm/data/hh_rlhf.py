"""HH-RLHF dialogues (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``): the prompt is everything up to the last assistant
turn, split there explicitly (a character-level common prefix of chosen and rejected can cut mid-word)."""

from __future__ import annotations

import re

ASSISTANT_TAG = "\n\nAssistant:"


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


def split_hh_messages(text: str) -> tuple[list[dict], list[dict]] | None:
    """(prompt messages, [final assistant message]) of an HH dialogue, or None without a final assistant turn."""
    messages = hh_dialogue_messages(text)
    if not messages or messages[-1]["role"] != "assistant" or len(messages) < 2:
        return None
    return messages[:-1], messages[-1:]
