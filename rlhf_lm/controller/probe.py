"""Probe-and-commit: train each candidate LR factor from the same snapshot on the same batches, keep the best.

At a probe every candidate in the spec's ``candidates`` trains ``probe_steps`` optimizer steps from one snapshot of
adapter + optimizer + schedule, on the *same* batches, and is scored on the *same* validation batch, so the scores
differ by the LR alone. The winner's weights and optimizer state are kept: its probe steps are real progress. A
winning increase f is committed to the LR as ``f ** increase_damping``, because a few-step probe favours large
steps (the short-horizon bias of Wu et al., 2018); decreases are taken in full. When to probe is
:class:`~rlhf_lm.controller.policies.online.ProbePlanner`'s call (the compute budget), which candidate wins is
``commit_rule``'s (:func:`~rlhf_lm.controller.policies.online.choose_candidate`, unless a caller replaces it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rlhf_lm.controller.handle import TrainerHandle
from rlhf_lm.controller.policies.base import Decision
from rlhf_lm.controller.policies.online import ProbePlanner, choose_candidate
from rlhf_lm.controller.spec import ControllerSpec


class ProbeAndCommit:
    def __init__(self, spec: ControllerSpec):
        self.spec = spec
        self.commit_rule: Callable[[dict[float, float]], float] = choose_candidate
        self.planner: ProbePlanner | None = None
        self.probes = 0
        self.records: list[dict[str, Any]] = []  # features + score per candidate: hindsight training data
        self._seconds: dict[str, list[float]] = {"step": [], "val": []}
        self._batches = None

    def start(self, handle: TrainerHandle, max_steps: int, has_validation_batch: bool) -> None:
        """Plan probes for a run of ``max_steps``. The first guess of one validation pass, in training steps, is
        replaced by measurements once probes run: a train step is forward + backward (~3 forwards) plus, for DPO, a
        reference forward - ~4 forward units per example; a validation pass (policy + reference) ~2 units."""
        val_cost = self.spec.val_batch_size / (2.0 * handle.examples_per_step()) if has_validation_batch else 0.0
        self.planner = ProbePlanner(self.spec.candidates, self.spec.probe_steps, self.spec.compute_budget, max_steps,
                                    self.spec.interval, val_cost=val_cost, probe_every=self.spec.probe_every)

    def measured(self, objective: Callable[[], float]) -> float:
        """``objective()``, timed: the planner charges what evaluations really cost (DPO's also runs the reference),
        in units of a measured training step."""
        start = time.perf_counter()
        value = objective()
        self._seconds["val"].append(time.perf_counter() - start)
        if self._seconds["step"]:
            self.planner.val_cost = min(self._seconds["val"]) / min(self._seconds["step"])
        return value

    def should_probe(self, handle: TrainerHandle, decision_index: int) -> bool:
        """Charge this decision's objective measurement, then ask the planner; rank 0's answer holds for all ranks
        (each rank's planner budgets on its own timings, and a probe runs DDP collectives)."""
        self.planner.charge(self.planner.decision_cost())
        return handle.broadcast(self.planner.should_probe(decision_index))

    def run(self, handle: TrainerHandle, objective: Callable[[], float], clip: Callable[[float], float],
            features: dict[str, float], current: float) -> tuple[Decision, float]:
        """Probe every candidate and leave the trainer in the winner's state. ``clip`` bounds a factor by the
        controller's LR multiplier limits; ``current`` is the objective before the probe. Returns the decision to
        apply (the committed LR factor) and the winner's score."""
        with handle.metrics_kept():
            start = handle.snapshot()
            batches = [self._next_step_batches(handle) for _ in range(self.spec.probe_steps)]
            scores: dict[float, float] = {}
            kept = {}  # the best candidate so far -> its snapshot
            for factor in self.spec.candidates:  # scores are keyed by the nominal factor; bounds apply to the LR
                handle.restore(start)
                handle.set_learning_rate(clip(factor))
                self._train(handle, batches)
                scores[factor] = self.measured(objective)
                if scores[factor] == min(scores.values()):
                    kept = {factor: handle.snapshot()}
            best = handle.broadcast(self.commit_rule(scores))
            handle.restore(kept.get(best, start))
            # the commit rule may pick another than the lowest score (a near-tie goes to the larger step; training
            # the learned policy explores): replay that candidate rather than keep another's state
            if best not in kept:
                handle.set_learning_rate(clip(best))
                self._train(handle, batches)
                handle.set_learning_rate(1.0)
                self.planner.charge(self.spec.probe_steps)
        self.planner.charge(self.planner.probe_cost())
        self.probes += 1
        self.records.append({"features": features, "objective": current,
                             "scores": {str(f): s for f, s in scores.items()}, "chosen": best})
        # the kept weights trained at the winning factor; the LR from here on takes an increase only part way
        committed = best ** self.spec.increase_damping if best > 1.0 else best
        decision = Decision(lr_factor=committed,
                            reason=f"probe {', '.join(f'{f:g}:{s:.4g}' for f, s in scores.items())}")
        return decision, scores[best]

    def _train(self, handle: TrainerHandle, batches: list[list[dict]]) -> None:
        for micro_batches in batches:
            start = time.perf_counter()
            handle.train_step(micro_batches)
            self._seconds["step"].append(time.perf_counter() - start)

    def _next_step_batches(self, handle: TrainerHandle) -> list[dict]:
        """The micro-batches of one optimizer step, from a shuffle of the training set that carries on across probes
        (a new shuffle, seeded by the probe count, when the last one runs out)."""
        micro = []
        for _ in range(handle.micro_batches_per_step()):
            batch = next(self._batches, None) if self._batches is not None else None
            if batch is None:
                self._batches = iter(handle.training_batches(seed=self.spec.seed + 1000 * self.probes))
                batch = next(self._batches)
            micro.append(batch)
        return micro

    def state_dict(self) -> dict[str, Any]:
        return {"probes": self.probes, "planner": self.planner.state_dict() if self.planner else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probes = state["probes"]
        if self.planner is not None and state.get("planner"):
            self.planner.load_state_dict(state["planner"])
