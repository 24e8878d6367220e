"""One TrainerCallback that runs any controller policy inside any stage's trainer.

Every ``interval`` optimizer steps it measures the held-out objective (the stage's loss on a fixed validation
batch; for RL stages, the logged reward), rolls back to the last good snapshot if training diverged, otherwise asks
the policy for a decision and applies it: an LR factor through the scheduler's base rates, a factor on the live
beta / KL coefficient, and which LoRA layer group trains. The online policy first probes candidate LR factors on
the same batches and commits the best. Rank 0 decides and broadcasts; the state is saved with every checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from rlhf_lm.controller import actions, controller_objective
from rlhf_lm.controller.policies.base import Decision
from rlhf_lm.controller.policies.online import ProbePlanner, choose_candidate
from rlhf_lm.controller.snapshot import Snapshot
from rlhf_lm.controller.spec import ControllerSpec
from rlhf_lm.controller.state import SignalTracker

logger = logging.getLogger(__name__)
STATE_FILE = "controller_state.json"


def find_trainer(callback: TrainerCallback) -> Any:
    """The trainer whose callback handler holds ``callback``, found up the call stack.

    TrainerCallback events pass model / optimizer / scheduler but not the trainer, and beta lives on the trainer
    (TRL's DPO/GRPO/RLOO read ``self.beta``). Events are always called from a trainer method, so the trainer is a
    ``self`` a few frames up. Stages may call ``attach(trainer)`` instead; our PPO trainer passes ``trainer=``.
    """
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        handler = getattr(obj, "callback_handler", None)
        if handler is not None and any(cb is callback for cb in getattr(handler, "callbacks", [])):
            return obj
        frame = frame.f_back
    return None


class ControllerCallback(TrainerCallback):
    def __init__(self, spec: ControllerSpec, stage: str, policy: Any):
        self.spec, self.stage, self.policy = spec, stage, policy
        self.objective = controller_objective(stage)  # "loss" on a held-out batch, or the logged "reward"
        self.tracker = SignalTracker()
        self.lr_multiplier, self.beta_multiplier, self.layer_group = 1.0, 1.0, "all"
        self.base_beta: float | None = None
        self.decisions, self.rollbacks, self.probes = 0, 0, 0
        self.best_objective = math.inf
        self.history: list[dict[str, Any]] = []      # every applied decision, for metrics.json and tests
        self.probe_records: list[dict[str, Any]] = []  # features + score per candidate: hindsight training data
        self.trainer: Any = None
        self.planner: ProbePlanner | None = None
        self._good: Snapshot | None = None
        self._pending_logs: dict[str, float] = {}
        self._val_batch: dict | None = None
        self._probe_iter = None
        self._timing: dict[str, list[float]] = {"step": [], "val": []}
        self.commit_rule = choose_candidate  # which probed factor to keep (learned-policy training explores here)

    # ------------------------------------------------------------------------------------------------ wiring
    def attach(self, trainer: Any) -> ControllerCallback:
        """Point the controller at ``trainer`` explicitly (optional: it finds the trainer itself)."""
        self.trainer = trainer
        return self

    @property
    def _optimizer(self):
        return self.trainer.optimizer

    @property
    def _scheduler(self):
        return self.trainer.lr_scheduler

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer = kwargs.get("trainer") or self.trainer or find_trainer(self)
        if self.trainer is None:
            raise RuntimeError("The controller could not find its trainer; call callback.attach(trainer).")
        handler = self.trainer.callback_handler
        # go first, so reporting integrations (wandb, tensorboard) see the controller/* keys we add to each log;
        # a new list, because the handler is iterating the old one right now
        handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]
        model = self.trainer.model
        self.params = actions.trainable_parameters(model)
        self.base_beta = actions.kl_coefficient(self.trainer)
        self.max_steps = max(int(state.max_steps or 1), 1)
        if self.objective == "loss":
            self._val_batch = self._make_val_batch()
        if self.spec.policy == "online":
            self.planner = ProbePlanner(self.spec.candidates, self.spec.probe_steps, self.spec.compute_budget,
                                        self.max_steps, self.spec.interval, val_cost=self._val_cost(),
                                        probe_every=self.spec.probe_every)
        if state.global_step > 0:
            self._restore(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE)
        else:
            self._apply_layer_group(self._initial_layer_group())
        self._good = self._snapshot()
        if state.global_step == 0:  # the starting objective anchors divergence detection
            self.best_objective = self._objective()
        if state.global_step == 0 and self.spec.policy == "online":
            self._decide(state)  # the starting LR matters most: probe before the first step
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.spec.interval == 0 and state.global_step < self.max_steps:
            self._decide(state)
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._drop_frozen_grads()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return control
        self.tracker.observe_logs(logs)
        extra = {
            "controller/lr_multiplier": self.lr_multiplier,
            "controller/lr": actions.learning_rates(self._optimizer)[0] if self.trainer else float("nan"),
            "controller/decisions": float(self.decisions),
            "controller/rollbacks": float(self.rollbacks),
            "controller/trainable_fraction": self._trainable_fraction(),
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
        objective = self._broadcast(self._objective())
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
        if self.planner is not None:
            self.planner.charge(self.planner.decision_cost())
        if self.planner is not None and self._broadcast(self.planner.should_probe(self.decisions)):
            decision = self._probe(features, objective)
        else:
            decision = self._broadcast(self.policy.decide(features))
        self._apply(decision)
        self.decisions += 1
        self.history.append({"step": state.global_step, "objective": objective, **decision.as_dict(),
                             "lr_multiplier": self.lr_multiplier, "beta_multiplier": self.beta_multiplier,
                             "layer_group": self.layer_group})
        self._pending_logs.update({"controller/objective": objective, "controller/lr_factor": decision.lr_factor,
                                   "controller/beta_factor": decision.beta_factor})
        self._good = self._snapshot()

    def _apply(self, decision: Decision) -> None:
        if self.spec.control_lr and decision.lr_factor != 1.0:
            factor = self._clip_lr_factor(decision.lr_factor)
            actions.scale_learning_rate(self._optimizer, self._scheduler, factor)
            self.lr_multiplier *= factor
        if self.spec.control_beta and decision.beta_factor != 1.0 and self.base_beta:
            self.beta_multiplier *= decision.beta_factor
            actions.set_kl_coefficient(self.trainer, self.base_beta * self.beta_multiplier)
        if decision.layer_group and decision.layer_group != self.layer_group:
            self._apply_layer_group(decision.layer_group)

    def _clip_lr_factor(self, factor: float) -> float:
        total = min(max(self.lr_multiplier * factor, self.spec.min_lr_multiplier), self.spec.max_lr_multiplier)
        return total / self.lr_multiplier

    def _rollback(self, state, objective: float) -> None:
        """Divergence: restore the last good adapter + optimizer state and halve the LR."""
        self.rollbacks += 1
        logger.warning("controller: objective %.4g diverged (best %.4g) at step %d; rolling back and halving the LR",
                       objective, self.best_objective, state.global_step)
        self._good.restore(self.params, self._optimizer)  # weights and moments; the schedule keeps its position
        decision = Decision(lr_factor=0.5, rollback=True, reason="divergence")
        self._apply(decision)
        self.history.append({"step": state.global_step, "objective": objective, **decision.as_dict(),
                             "lr_multiplier": self.lr_multiplier, "beta_multiplier": self.beta_multiplier,
                             "layer_group": self.layer_group})
        self._pending_logs.update({"controller/objective": objective, "controller/rollback": 1.0})

    # ----------------------------------------------------------------------------------------- online probing
    def _probe(self, features: dict[str, float], objective: float) -> Decision:
        """Train each candidate LR factor on the same batches from the same snapshot; keep the best one's state."""
        trainer = self.trainer
        saved_metrics = copy.deepcopy(getattr(trainer, "_metrics", None))
        start = self._snapshot()
        batches = [self._next_probe_batch() for _ in range(self.spec.probe_steps)]
        scores, states = {}, {}
        for factor in self.spec.candidates:  # scores are keyed by the nominal factor; bounds apply to the LR
            start.restore(self.params, self._optimizer, self._scheduler)
            for group in self._optimizer.param_groups:
                group["lr"] = group["lr"] * self._clip_lr_factor(factor)
            for batch in batches:
                self._train_step(batch)
            scores[factor] = self._objective()
            if scores[factor] == min(scores.values()):
                states[factor] = self._snapshot()
                states = {factor: states[factor]}
        best = self._broadcast(self.commit_rule(scores))
        states.get(best, start).restore(self.params, self._optimizer, self._scheduler)
        if best not in states:  # a near-tie went to the factor nearest 1: replay it rather than keep another's state
            for group in self._optimizer.param_groups:
                group["lr"] = group["lr"] * self._clip_lr_factor(best)
            for batch in batches:
                self._train_step(batch)
            for group in self._optimizer.param_groups:
                group["lr"] = group["lr"] / self._clip_lr_factor(best)
            self.planner.charge(self.spec.probe_steps)
        self.planner.charge(self.planner.probe_cost())
        if saved_metrics is not None:
            trainer._metrics = saved_metrics
        self.probes += 1
        self.probe_records.append({"features": features, "objective": objective,
                                   "scores": {str(f): s for f, s in scores.items()}, "chosen": best})
        self._pending_logs["controller/probe_best"] = scores[best]
        # the kept weights trained at the winning factor; the LR from here on takes an increase only part way
        committed = best ** self.spec.increase_damping if best > 1.0 else best
        return Decision(lr_factor=committed,
                        reason=f"probe {', '.join(f'{f:g}:{s:.4g}' for f, s in scores.items())}")

    def _train_step(self, batch: list[dict]) -> None:
        start = time.perf_counter()
        self._one_step(batch)
        self._timing["step"].append(time.perf_counter() - start)

    def _one_step(self, batch: list[dict]) -> None:
        trainer, args = self.trainer, self.trainer.args
        model = getattr(trainer, "model_wrapped", None) or trainer.model
        saved_accumulation = getattr(trainer, "current_gradient_accumulation_steps", None)
        trainer.current_gradient_accumulation_steps = len(batch)  # training_step divides the loss by it
        for micro in batch:
            trainer.training_step(model, micro)
        if saved_accumulation is not None:
            trainer.current_gradient_accumulation_steps = saved_accumulation
        self._drop_frozen_grads()
        if args.max_grad_norm:
            trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), args.max_grad_norm)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)

    def _next_probe_batch(self) -> list[dict]:
        args = self.trainer.args
        micro = []
        for _ in range(max(int(args.gradient_accumulation_steps), 1)):
            try:
                micro.append(next(self._probe_iter))
            except (StopIteration, TypeError):
                self._probe_iter = iter(self._dataloader(self.trainer.train_dataset, args.per_device_train_batch_size,
                                                         shuffle=True))
                micro.append(next(self._probe_iter))
        return micro

    # -------------------------------------------------------------------------------------------- objective
    def _objective(self) -> float:
        """Lower is better: the stage loss on the fixed validation batch, else the negated logged reward."""
        start = time.perf_counter()
        value = self._measure_objective()
        self._timing["val"].append(time.perf_counter() - start)
        if self.planner is not None and self._timing["step"]:
            # charge what evaluations really cost (DPO's also runs the reference), measured against a train step
            self.planner.val_cost = min(self._timing["val"]) / min(self._timing["step"])
        return value

    def _measure_objective(self) -> float:
        if self._val_batch is not None:
            trainer = self.trainer
            model = trainer.model
            saved = copy.deepcopy(getattr(trainer, "_metrics", None))
            was_training = model.training
            model.eval()
            with torch.no_grad():
                loss = trainer.compute_loss(model, trainer._prepare_inputs(self._val_batch))
            model.train(was_training)
            if saved is not None:
                trainer._metrics = saved
            loss = loss.detach().float()
            if trainer.accelerator.num_processes > 1:
                loss = trainer.accelerator.reduce(loss, reduction="mean")
            return float(loss)
        if "reward" in self.tracker.last:
            return -self.tracker.last["reward"]
        value = self.tracker.loss_fast.get()
        return float(value) if value is not None else 0.0

    def _make_val_batch(self) -> dict | None:
        trainer = self.trainer
        dataset = trainer.eval_dataset
        if isinstance(dataset, dict):
            dataset = next(iter(dataset.values()))
        if dataset is None:
            dataset = trainer.train_dataset
            logger.warning("controller: no eval_dataset; scoring on a fixed batch of training rows")
        loader = self._dataloader(dataset, self.spec.val_batch_size, shuffle=True)
        return next(iter(loader))

    def _dataloader(self, dataset, batch_size: int, shuffle: bool):
        trainer = self.trainer
        if hasattr(trainer, "_remove_unused_columns") and hasattr(dataset, "column_names"):
            dataset = trainer._remove_unused_columns(dataset, description="controller")
        generator = torch.Generator().manual_seed(self.spec.seed + 1000 * self.probes)
        return torch.utils.data.DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=shuffle,
                                           generator=generator, collate_fn=trainer.data_collator, drop_last=True)

    def _val_cost(self) -> float:
        """A first guess of one validation pass in training steps (replaced by measurements once probes run).

        A train step is forward + backward (~3 forwards) plus, for DPO, a reference forward: ~4 forward units per
        example; a validation pass is policy + reference forward: ~2 units per example."""
        if self._val_batch is None:
            return 0.0
        args = self.trainer.args
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        return self.spec.val_batch_size / (2.0 * batch)

    # ------------------------------------------------------------------------------------------------ helpers
    def _initial_layer_group(self) -> str:
        schedule = self.spec.layer_schedule
        return schedule[0] if schedule else "all"

    def _apply_layer_group(self, group: str) -> None:
        flags = actions.set_trainable_group(self.params, group)
        self._frozen = [self.params[n] for n, trains in flags.items() if not trains]
        self.layer_group = group

    def _drop_frozen_grads(self) -> None:
        """Keep frozen groups frozen: PEFT's adapter toggling (DPO's reference pass runs with the adapter disabled)
        sets requires_grad back to True on every active adapter, so grads are dropped before each optimizer step
        (AdamW skips a parameter whose grad is None) and requires_grad is cleared again."""
        for p in getattr(self, "_frozen", []):
            p.grad = None
            p.requires_grad_(False)

    def _trainable_fraction(self) -> float:
        params = getattr(self, "params", {})
        total = sum(p.numel() for p in params.values())
        return sum(p.numel() for p in params.values() if p.requires_grad) / total if total else 1.0

    def _measure_update_ratio(self, state) -> None:
        """log10 of |theta - theta_last_decision| / |theta_last_decision| per step: the LR's effective size."""
        if self._good is None:
            return
        steps = max(state.global_step - self._good.extra.get("step", 0), 1)
        num = sum(float((p.detach() - self._good.params[n]).float().norm() ** 2) for n, p in self.params.items())
        den = sum(float(t.float().norm() ** 2) for t in self._good.params.values())
        if num > 0 and den > 0:
            self.tracker.update_ratio = math.log10(math.sqrt(num / den) / steps)

    def _snapshot(self) -> Snapshot:
        step = self.trainer.state.global_step if self.trainer is not None else 0
        return Snapshot.capture(self.params, self._optimizer, self._scheduler, step=step)

    def _broadcast(self, obj: Any) -> Any:
        """Rank 0's decision for every rank (policies and probe scores can differ by float noise across ranks)."""
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is None or accelerator.num_processes <= 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj if accelerator.is_main_process else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    # -------------------------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(), "stage": self.stage, "lr_multiplier": self.lr_multiplier,
            "beta_multiplier": self.beta_multiplier, "base_beta": self.base_beta, "layer_group": self.layer_group,
            "decisions": self.decisions,
            "rollbacks": self.rollbacks, "probes": self.probes, "best_objective": self.best_objective,
            "history": self.history, "tracker": self.tracker.state_dict(), "policy": self.policy.state_dict(),
            "planner": self.planner.state_dict() if self.planner else None,
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
        self.decisions, self.rollbacks, self.probes = state["decisions"], state["rollbacks"], state["probes"]
        self.best_objective, self.history = state["best_objective"], state["history"]
        self.tracker.load_state_dict(state["tracker"])
        self.policy.load_state_dict(state["policy"])
        if self.planner is not None and state.get("planner"):
            self.planner.load_state_dict(state["planner"])
        # the LR multiplier already came back inside the scheduler's state (base_lrs); beta lives on the trainer
        if self.base_beta is not None and self.spec.control_beta:
            actions.set_kl_coefficient(self.trainer, self.base_beta * self.beta_multiplier)
        self._apply_layer_group(state["layer_group"])

    def summary(self) -> dict[str, float]:
        """Final numbers for a stage's metrics.json."""
        return {"controller/lr_multiplier": self.lr_multiplier, "controller/beta_multiplier": self.beta_multiplier,
                "controller/decisions": float(self.decisions), "controller/rollbacks": float(self.rollbacks),
                "controller/probes": float(self.probes)}
