"""Reward models with the mistakes the corpus checks for: each must stop a run before training, in one line."""

import math


def nan_reward(prompt, completion):
    return math.nan  # e.g. a normalisation that divides by a zero std


def raising_reward(prompt, completion):
    raise ValueError("the reward server is down")


class WrongShape:
    def __call__(self, prompts, completions):
        return [1.0, 2.0, 3.0][: len(prompts) + 1]
