"""Online probe-and-commit: the policy, when to probe, and which candidate to commit (the loop is in probe.py).

At a probe the controller snapshots adapter + optimizer, trains each candidate LR factor for ``probe_steps`` on the
same batches, scores each on the same held-out batch, and keeps the best candidate's weights and optimizer state
(its probe steps are real progress, not thrown away). Probes go to the earliest decisions, where a badly chosen
starting LR costs the most, until the compute budget (in units of one run without the controller) is spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf_lm.controller.policies.rules import RulesPolicy


class OnlinePolicy(RulesPolicy):
    """Probe-and-commit at the decisions the compute budget allows (the spec's ``candidates``, ``probe_steps``,
    ``compute_budget``, ``probe_every``); the rules (plateau, adaptive KL, layer schedule) decide in between."""

    probes = True


@dataclass
class ProbePlanner:
    candidates: list[float]
    probe_steps: int
    compute_budget: float
    max_steps: int
    interval: int
    val_cost: float = 1.0  # one held-out evaluation, in units of one training step
    probe_every: int | None = None
    spent: float = 0.0  # extra compute so far, in training steps

    def probe_cost(self) -> float:
        # every candidate trains probe_steps and is scored once; the winner's steps count as progress, not extra
        return (len(self.candidates) - 1) * self.probe_steps + len(self.candidates) * self.val_cost

    def decision_cost(self) -> float:
        return self.val_cost  # the held-out objective measured at every decision

    def budget(self) -> float:
        return (self.compute_budget - 1.0) * self.max_steps

    def should_probe(self, decision_index: int) -> bool:
        if self.probe_every and decision_index % self.probe_every:
            return False
        remaining_decisions = max(self.max_steps // self.interval - decision_index - 1, 0)
        reserve = remaining_decisions * self.decision_cost()
        return self.spent + self.probe_cost() + reserve <= self.budget()

    def charge(self, steps: float) -> None:
        self.spent += steps

    def state_dict(self) -> dict:
        return {"spent": self.spent}

    def load_state_dict(self, state: dict) -> None:
        self.spent = float(state["spent"])


def choose_candidate(scores: dict[float, float], tolerance: float = 1e-5) -> float:
    """The factor with the lowest held-out score; among near-ties (within ``tolerance``, relative), the largest.

    Every candidate is scored on the same validation batch, so differences come from the weights alone. Candidates
    tie when none of them moved the objective - the learning rate is too small to matter - and then the largest
    step is the one that can make progress. A too-large LR never ties: it makes the objective worse.
    """
    finite = {f: s for f, s in scores.items() if math.isfinite(s)}
    if not finite:
        return min(scores)
    best = min(finite.values())
    return max(f for f, s in finite.items() if s <= best + abs(best) * tolerance)
