"""Rule baselines: reduce-on-plateau for the LR, the adaptive KL controller for beta, a layer-group schedule."""

from __future__ import annotations

import math
from typing import Any

from rlhf_lm.controller.policies.base import Decision


def plateau_step(history: list[float], best: float, bad_decisions: int, patience: int, threshold: float
                 ) -> tuple[bool, float, int]:
    """Reduce-on-plateau (torch's ReduceLROnPlateau, mode=min, relative threshold) on the held-out objective.

    Returns (reduce_now, best, bad_decisions).
    """
    if not history:
        return False, best, bad_decisions
    current = history[-1]
    if current < best * (1 - threshold) if best > 0 else current < best - abs(best) * threshold:
        return False, current, 0
    bad_decisions += 1
    if bad_decisions > patience:
        return True, best, 0
    return False, best, bad_decisions


def adaptive_kl_factor(kl: float, target: float, horizon: float) -> float:
    """Ziegler et al. (2019): beta *= 1 + clip(KL/target - 1, -0.2, 0.2) / horizon, per decision."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return 1.0 + error / horizon


def layer_phase(schedule: list[str] | None, progress: float) -> str | None:
    """The schedule's phase for ``progress`` in [0, 1): phases are equal slices of training."""
    if not schedule:
        return None
    return schedule[min(int(progress * len(schedule)), len(schedule) - 1)]


class RulesPolicy:
    """Reduce the LR when the held-out objective plateaus, steer beta toward a KL target, follow a layer schedule."""

    probes = False

    def __init__(self, patience: int = 2, factor: float = 0.5, threshold: float = 1e-3, control_lr: bool = True,
                 kl_target: float | None = None, kl_horizon: float = 10.0, layer_schedule: list[str] | None = None):
        self.patience, self.factor, self.threshold = patience, factor, threshold
        self.control_lr, self.kl_target, self.kl_horizon = control_lr, kl_target, kl_horizon
        self.layer_schedule = layer_schedule
        self.best, self.bad = math.inf, 0
        self.history: list[float] = []

    def observe(self, objective: float) -> None:
        self.history.append(objective)

    def decide(self, features: dict[str, float]) -> Decision:
        decision, reasons = Decision(), []
        if self.control_lr:
            reduce, self.best, self.bad = plateau_step(self.history, self.best, self.bad, self.patience,
                                                      self.threshold)
            if reduce:
                decision.lr_factor = self.factor
                reasons.append("plateau")
        if self.kl_target and features.get("kl_over_budget"):
            kl = (features["kl_over_budget"] + 1.0) * self.kl_target
            decision.beta_factor = adaptive_kl_factor(kl, self.kl_target, self.kl_horizon)
            reasons.append("adaptive_kl")
        decision.layer_group = layer_phase(self.layer_schedule, features.get("progress", 0.0))
        decision.reason = "+".join(reasons)
        return decision

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad, self.history = state["best"], state["bad"], list(state["history"])
