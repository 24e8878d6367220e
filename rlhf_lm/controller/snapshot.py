"""Adapter + optimizer + scheduler snapshots, for rollback after a divergence and for probing candidates."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class Snapshot:
    """Everything a few training steps change: the trainable weights, the optimizer and scheduler state.

    Only trainable parameters are copied (with LoRA: the adapters, a few MB at most), so taking one is cheap.
    """

    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(cls, params: dict[str, torch.nn.Parameter], optimizer, scheduler=None, **extra) -> Snapshot:
        inner = getattr(scheduler, "scheduler", scheduler)
        return cls(
            params={name: p.detach().clone() for name, p in params.items()},
            optimizer=_clone(optimizer.state_dict()),
            scheduler=_clone(inner.state_dict()) if inner is not None else None,
            extra=copy.deepcopy(extra),
        )

    @torch.no_grad()
    def restore(self, params: dict[str, torch.nn.Parameter], optimizer, scheduler=None) -> None:
        """Put weights, optimizer moments and the schedule back exactly (bit for bit) as they were captured."""
        for name, p in params.items():
            p.copy_(self.params[name])
            p.grad = None
        # load_state_dict keeps references to the tensors it is given: pass copies so the snapshot stays reusable
        optimizer.load_state_dict(_clone(self.optimizer))
        inner = getattr(scheduler, "scheduler", scheduler)
        if inner is not None and self.scheduler is not None:
            inner.load_state_dict(_clone(self.scheduler))
        # the optimizer's LR is left as loaded: TrainerHandle.restore puts it back on the schedule (its one writer)
