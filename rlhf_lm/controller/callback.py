"""One TrainerCallback that runs any controller policy inside any stage's trainer.

Every ``interval`` optimizer steps it measures the held-out objective (the stage's loss on a fixed validation
batch; for RL stages, the logged reward), rolls back to the last good snapshot if training diverged, otherwise asks
the policy for a decision and applies it: an LR factor on the schedule, a factor on the live beta / KL coefficient,
and which LoRA layer group trains. A policy that probes (``policy.probes``) gets probe-and-commit
(:mod:`rlhf_lm.controller.probe`) where the compute budget allows. Rank 0 decides and broadcasts; the state is saved
with every checkpoint. Everything done to the trainer goes through :class:`~rlhf_lm.controller.handle.TrainerHandle`.

Attach it to a built trainer with :meth:`ControllerCallback.attach` (``rlhf_lm.controller.attach_controller`` builds
and attaches one from a recipe's ``controller:``); our PPO trainer also hands itself to callbacks given at
construction.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from rlhf_lm.controller.handle import TrainerHandle
from rlhf_lm.controller.policies.base import Decision, Policy
from rlhf_lm.controller.probe import ProbeAndCommit
from rlhf_lm.controller.snapshot import Snapshot
from rlhf_lm.controller.spec import ControllerSpec, controller_objective
from rlhf_lm.controller.state import SignalTracker
from rlhf_lm.errors import ConfigError

logger = logging.getLogger(__name__)
STATE_FILE = "controller_state.json"
NOT_ATTACHED = ("The controller has no trainer: TrainerCallback events do not carry one. Build the trainer without "
                "it, then call controller.attach(trainer) (rlhf_lm.controller.attach_controller does both).")


class ControllerCallback(TrainerCallback):
    def __init__(self, spec: ControllerSpec, stage: str, policy: Policy):
        self.spec, self.stage, self.policy = spec, stage, policy
        self.objective = controller_objective(stage)  # "loss" on a held-out batch, or the logged "reward"
        self.tracker = SignalTracker()
        self.lr_multiplier, self.beta_multiplier, self.layer_group = 1.0, 1.0, "all"
        self.base_beta: float | None = None
        self.decisions, self.rollbacks = 0, 0
        self.best_objective = math.inf
        self.history: list[dict[str, Any]] = []  # every applied decision, for metrics.json and tests
        self.prober = ProbeAndCommit(spec) if getattr(policy, "probes", False) else None
        self.trainer: Any = None
        self.handle: TrainerHandle | None = None  # built when training begins
        self.max_steps = 1
        self._good: Snapshot | None = None  # the state a divergence rolls back to
        self._pending_logs: dict[str, float] = {}
        self._val_batch: dict | None = None

    # ------------------------------------------------------------------------------------------------ wiring
    def attach(self, trainer: Any) -> ControllerCallback:
        """Steer ``trainer`` (built, not yet training): it becomes the trainer's first callback (see
        :meth:`TrainerHandle.register_first` for why first)."""
        self.trainer = trainer
        TrainerHandle.register_first(trainer, self)
        return self

    @property
    def probes(self) -> int:
        return self.prober.probes if self.prober else 0

    @property
    def probe_records(self) -> list[dict[str, Any]]:
        return self.prober.records if self.prober else []

    @property
    def planner(self):
        return self.prober.planner if self.prober else None

    @property
    def commit_rule(self):
        return self.prober.commit_rule

    @commit_rule.setter
    def commit_rule(self, rule) -> None:  # which probed factor to keep (learned-policy training explores here)
        self.prober.commit_rule = rule

    def on_init_end(self, args, state, control, **kwargs):
        # given in a trainer's callbacks=: our PPO trainer sends itself with every event, TRL's trainers do not
        self.trainer = self.trainer or kwargs.get("trainer")
        if self.trainer is None:
            raise ConfigError(NOT_ATTACHED)
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer = self.trainer or kwargs.get("trainer")
        if self.trainer is None:
            raise ConfigError(NOT_ATTACHED)
        self.handle = TrainerHandle(self.trainer)
        self.base_beta = self.handle.kl_coefficient()
        self.max_steps = max(int(state.max_steps or 1), 1)
        if self.objective == "loss":
            self._val_batch = self.handle.validation_batch(self.spec.val_batch_size, seed=self.spec.seed)
        if self.prober is not None:
            self.prober.start(self.handle, self.max_steps, has_validation_batch=self._val_batch is not None)
        if state.global_step > 0:
            self._restore(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE)
        else:
            self._set_layer_group(self.spec.layer_schedule[0] if self.spec.layer_schedule else "all")
        self._good = self.handle.snapshot()
        if state.global_step == 0:  # the starting objective anchors divergence detection
            self.best_objective = self._objective()
            if self.prober is not None:
                self._decide(state)  # the starting LR matters most: probe before the first step
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.spec.interval == 0 and state.global_step < self.max_steps:
            self._decide(state)
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.handle.drop_frozen_grads()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return control
        self.tracker.observe_logs(logs)
        extra = {
            "controller/lr_multiplier": self.lr_multiplier,
            "controller/lr": self.handle.learning_rates()[0] if self.handle else float("nan"),
            "controller/decisions": float(self.decisions),
            "controller/rollbacks": float(self.rollbacks),
            "controller/trainable_fraction": self.handle.trainable_fraction() if self.handle else 1.0,
            **self._pending_logs,
        }
        if self.base_beta is not None:
            extra["controller/beta"] = self.base_beta * self.beta_multiplier
        if self.planner is not None:
            extra["controller/probe_steps_spent"] = self.planner.spent
        self._pending_logs = {}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        return control

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            directory.mkdir(parents=True, exist_ok=True)
            (directory / STATE_FILE).write_text(json.dumps(self.state_dict(), indent=2))
        return control

    # -------------------------------------------------------------------------------------------- the decision
    def _decide(self, state) -> None:
        # Every branch below must go the same way on every rank (a probe runs DDP collectives): rank 0's objective
        # and rank 0's choice to probe, which rests on its own timings, hold for all.
        objective = self.handle.broadcast(self._objective())
        progress = state.global_step / self.max_steps
        self._measure_update_ratio(state)
        if not math.isfinite(objective) or objective > self.spec.divergence_factor * self.best_objective > 0:
            self._rollback(state, objective)
            return
        self.tracker.observe_objective(objective)
        if hasattr(self.policy, "observe"):
            self.policy.observe(objective)
        self.best_objective = min(self.best_objective, objective)
        features = self.tracker.features(progress, self.lr_multiplier, self.beta_multiplier, self.spec.kl_target)
        if self.prober is not None and self.prober.should_probe(self.handle, self.decisions):
            decision, best_score = self.prober.run(self.handle, self._objective, self._clip_lr_factor, features,
                                                   objective)
            self._pending_logs["controller/probe_best"] = best_score
        else:
            decision = self.handle.broadcast(self.policy.decide(features))
        self._apply(decision)
        self.decisions += 1
        self._record(state, objective, decision)
        self._pending_logs.update({"controller/objective": objective, "controller/lr_factor": decision.lr_factor,
                                   "controller/beta_factor": decision.beta_factor})
        self._good = self.handle.snapshot()

    def _apply(self, decision: Decision) -> None:
        if self.spec.control_lr and decision.lr_factor != 1.0:
            factor = self._clip_lr_factor(decision.lr_factor)
            self.handle.set_learning_rate(factor, lasting=True)
            self.lr_multiplier *= factor
        if self.spec.control_beta and decision.beta_factor != 1.0 and self.base_beta:
            self.beta_multiplier *= decision.beta_factor
            self.handle.set_kl_coefficient(self.base_beta * self.beta_multiplier)
        if decision.layer_group and decision.layer_group != self.layer_group:
            self._set_layer_group(decision.layer_group)

    def _clip_lr_factor(self, factor: float) -> float:
        total = min(max(self.lr_multiplier * factor, self.spec.min_lr_multiplier), self.spec.max_lr_multiplier)
        return total / self.lr_multiplier

    def _rollback(self, state, objective: float) -> None:
        """Divergence: restore the last good adapter + optimizer state and halve the LR."""
        self.rollbacks += 1
        logger.warning("controller: objective %.4g diverged (best %.4g) at step %d; rolling back and halving the LR",
                       objective, self.best_objective, state.global_step)
        self.handle.restore(self._good, schedule=False)  # weights and moments; the schedule keeps its position
        decision = Decision(lr_factor=0.5, rollback=True, reason="divergence")
        self._apply(decision)
        self._record(state, objective, decision)
        self._pending_logs.update({"controller/objective": objective, "controller/rollback": 1.0})

    def _record(self, state, objective: float, decision: Decision) -> None:
        self.history.append({"step": state.global_step, "objective": objective, **decision.as_dict(),
                             "lr_multiplier": self.lr_multiplier, "beta_multiplier": self.beta_multiplier,
                             "layer_group": self.layer_group})

    def _set_layer_group(self, group: str) -> None:
        self.handle.train_layer_group(group)
        self.layer_group = group

    # -------------------------------------------------------------------------------------------- objective
    def _objective(self) -> float:
        """Lower is better: the stage loss on the fixed validation batch, else the negated logged reward. Timed
        when probing, so the probe budget is charged what an evaluation really costs."""
        return self.prober.measured(self._measure_objective) if self.prober else self._measure_objective()

    def _measure_objective(self) -> float:
        if self._val_batch is not None:
            return self.handle.loss(self._val_batch)
        if "reward" in self.tracker.last:
            return -self.tracker.last["reward"]
        value = self.tracker.loss_fast.get()
        return float(value) if value is not None else 0.0

    def _measure_update_ratio(self, state) -> None:
        """log10 of |theta - theta_last_decision| / |theta_last_decision| per step: the LR's effective size."""
        if self._good is None:
            return
        steps = max(state.global_step - self._good.extra.get("step", 0), 1)
        ratio = self.handle.relative_update(self._good)
        if ratio > 0:
            self.tracker.update_ratio = math.log10(ratio / steps)

    # -------------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(), "stage": self.stage, "lr_multiplier": self.lr_multiplier,
            "beta_multiplier": self.beta_multiplier, "base_beta": self.base_beta, "layer_group": self.layer_group,
            "decisions": self.decisions, "rollbacks": self.rollbacks, "probes": self.probes,
            "best_objective": self.best_objective, "history": self.history, "tracker": self.tracker.state_dict(),
            "policy": self.policy.state_dict(), "planner": self.planner.state_dict() if self.planner else None,
        }

    def _restore(self, path: Path) -> None:
        if not path.is_file():
            logger.warning("controller: resuming without %s; starting the controller afresh", path)
            return
        state = json.loads(path.read_text())
        self.lr_multiplier, self.beta_multiplier = state["lr_multiplier"], state["beta_multiplier"]
        # The base is the coefficient the run started from. Read live at on_train_begin it would already carry the
        # multiplier wherever the trainer restores the coefficient itself (PPO's KL controller is in its checkpoint),
        # and the multiplier would then be applied twice.
        self.base_beta = state.get("base_beta", self.base_beta)
        self.decisions, self.rollbacks = state["decisions"], state["rollbacks"]
        self.best_objective, self.history = state["best_objective"], state["history"]
        self.tracker.load_state_dict(state["tracker"])
        self.policy.load_state_dict(state["policy"])
        if self.prober is not None:
            self.prober.load_state_dict(state)
        # the LR multiplier already came back inside the scheduler's state (base_lrs); beta lives on the trainer
        if self.base_beta is not None and self.spec.control_beta:
            self.handle.set_kl_coefficient(self.base_beta * self.beta_multiplier)
        self._set_layer_group(state["layer_group"])

    def report(self) -> dict[str, Any]:
        """The controller's final state and every decision it applied: the ``controller`` entry of a stage's
        metrics.json, which the model card summarises. Non-finite numbers (a diverged objective) become None."""
        args = getattr(self.trainer, "args", None)
        base_lr = getattr(args, "learning_rate", None)
        return _finite({
            "policy": self.spec.policy, "objective": self.objective,
            "final": {
                # the recipe's LR times the controller's multiplier: the height of the schedule it settled on
                "learning_rate": base_lr * self.lr_multiplier if base_lr is not None else None,
                "last_learning_rate": self.handle.learning_rates()[0] if self.handle else None,
                "lr_multiplier": self.lr_multiplier,
                "beta": self.handle.kl_coefficient() if self.handle else None,  # what the trainer reads now
                "beta_multiplier": self.beta_multiplier, "layer_group": self.layer_group,
                "decisions": self.decisions, "rollbacks": self.rollbacks, "probes": self.probes,
                "best_objective": self.best_objective,
            },
            "history": self.history,
        })


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
