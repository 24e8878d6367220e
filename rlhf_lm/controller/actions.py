"""The controller's actions on a live trainer: learning-rate multiplier, beta / KL coefficient, LoRA layer group.

Each action changes the object the trainer actually reads on its next step, so a test can observe it there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from rlhf_lm.controller.spec import LAYER_GROUPS, parse_layer_group

_LAYER_INDEX = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")


def _unwrap_scheduler(scheduler: Any) -> Any:
    return getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler wraps the real one


# ------------------------------------------------------------------------------------------------ learning rate
def scale_learning_rate(optimizer: torch.optim.Optimizer, scheduler: Any, factor: float) -> list[float]:
    """Multiply the learning rate by ``factor`` now and for the rest of the schedule; returns the new LRs.

    An LR written only into ``param_groups`` is overwritten by the next ``scheduler.step()`` (LambdaLR recomputes
    ``base_lr * lambda(step)``), so the change goes into the scheduler's ``base_lrs`` as well: warmup / decay keep
    their shape, scaled. ``base_lrs`` is part of the scheduler's state dict, so the change survives a resume.
    """
    inner = _unwrap_scheduler(scheduler)
    if inner is not None and hasattr(inner, "base_lrs"):
        inner.base_lrs = [lr * factor for lr in inner.base_lrs]
        if getattr(inner, "_last_lr", None) is not None:
            inner._last_lr = [lr * factor for lr in inner._last_lr]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    return [group["lr"] for group in optimizer.param_groups]


def learning_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


# ------------------------------------------------------------------------------------------- beta / KL coefficient
def kl_coefficient(trainer: Any) -> float | None:
    """The live KL coefficient: PPO's ``kl_ctl.value``, else ``trainer.beta`` (DPO, GRPO, RLOO); None if absent."""
    kl_ctl = getattr(trainer, "kl_ctl", None)
    if kl_ctl is not None and hasattr(kl_ctl, "value"):
        return float(kl_ctl.value)
    beta = getattr(trainer, "beta", None)
    return float(beta) if isinstance(beta, (int, float)) else None


def set_kl_coefficient(trainer: Any, value: float) -> None:
    """Set the value the trainer reads at its next loss (TRL 1.16 DPO/GRPO/RLOO read ``self.beta``, not args)."""
    kl_ctl = getattr(trainer, "kl_ctl", None)
    if kl_ctl is not None and hasattr(kl_ctl, "value"):
        kl_ctl.value = float(value)
    elif isinstance(getattr(trainer, "beta", None), (int, float)):
        if trainer.beta == 0.0:  # GRPO/RLOO without a reference model: there is no KL term to scale
            return
        trainer.beta = float(value)


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
