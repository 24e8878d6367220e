"""LoRA layer groups: which block each adapter belongs to, and training only the lower / middle / upper third.

Pure functions of parameter names and a dict of parameters; :class:`rlhf_lm.controller.handle.TrainerHandle` applies
them to a live trainer (as it does the learning rate and the KL coefficient).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from rlhf_lm.controller.spec import LAYER_GROUPS, parse_layer_group

_LAYER_INDEX = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")


# --------------------------------------------------------------------------------------------------- layer groups
def layer_index(name: str) -> int | None:
    """The transformer block a parameter belongs to, from its name (``...layers.3...`` -> 3); None outside blocks."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def layer_group(index: int, num_layers: int) -> str:
    """lower / middle / upper third of ``num_layers`` blocks (with 2 blocks: lower and upper)."""
    if num_layers <= 1:
        return "upper"
    return LAYER_GROUPS[round(2 * index / (num_layers - 1))]


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def set_trainable_group(params: dict[str, torch.nn.Parameter], group: str) -> dict[str, bool]:
    """Train only the adapter weights of ``group`` ('upper', 'lower+middle', 'all', ...) among ``params``.

    ``params`` are the parameters that were trainable when training began (the LoRA adapters and any
    ``modules_to_save`` such as a reward head). Those outside any block (heads) always train. A frozen parameter
    keeps its optimizer state and gets no gradient, so AdamW leaves it untouched.
    """
    wanted = parse_layer_group(group)
    indices = [i for i in (layer_index(n) for n in params) if i is not None]
    num_layers = max(indices) + 1 if indices else 0
    flags = {}
    for name, p in params.items():
        i = layer_index(name)
        flags[name] = i is None or layer_group(i, num_layers) in wanted
        p.requires_grad_(flags[name])
        if not flags[name]:
            p.grad = None
    return flags


def trainable_groups(params: Iterable[str]) -> dict[str, list[str]]:
    """Parameter names by layer group, for logs and tests."""
    names = list(params)
    indices = [i for i in (layer_index(n) for n in names) if i is not None]
    num_layers = max(indices) + 1 if indices else 0
    groups: dict[str, list[str]] = {g: [] for g in (*LAYER_GROUPS, "other")}
    for n in names:
        i = layer_index(n)
        groups["other" if i is None else layer_group(i, num_layers)].append(n)
    return groups
