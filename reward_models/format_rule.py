"""A rule-based reward: plain Python, no model. Rewards tidy, non-repetitive completions of a sensible length.

Load it in a recipe with ``reward_model: reward_models/format_rule.py:format_reward`` (a function is scored one
completion at a time) or ``reward_models/format_rule.py:FormatRule`` (a class, configurable, batched).

Rules like this are cheap, exact and hard to game in the ways a learned reward model is - and easy to game in their
own way, which is why they are usually mixed with a learned reward (see ``ensemble.py``).
"""

from __future__ import annotations

import torch


def format_reward(prompt: str, completion: str) -> float:
    """+1 for a well-formed completion, lower for each problem found; in [-1, 1]."""
    return FormatRule().score(completion)


class FormatRule:
    """Score = 1 minus a penalty per problem: no text, no final full stop, repeated sentences, too long.

    Args:
        max_words: completions longer than this lose ``length_penalty`` per extra word (capped at 1).
        length_penalty: penalty per word over ``max_words``.
    """

    def __init__(self, max_words: int = 24, length_penalty: float = 0.05):
        self.max_words, self.length_penalty = max_words, length_penalty
        self.name = f"FormatRule(max_words={max_words})"

    def score(self, completion: str) -> float:
        text = completion.strip()
        if not text:
            return -1.0
        sentences = [s.strip() for s in text.split(".") if s.strip()]
        penalty = 0.0
        if not text.endswith("."):
            penalty += 0.5  # cut off mid-sentence
        if len(set(sentences)) < len(sentences):
            penalty += 0.5 * (len(sentences) - len(set(sentences))) / len(sentences)  # repeats itself
        words = len(text.split())
        penalty += min(1.0, self.length_penalty * max(0, words - self.max_words))
        return max(-1.0, 1.0 - penalty)

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return torch.tensor([self.score(c) for c in completions], dtype=torch.float32)
