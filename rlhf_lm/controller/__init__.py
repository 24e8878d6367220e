"""The hyperparameter controller: an agent that watches training and steers LR, beta / KL and LoRA layer groups.

Stages build it before loading anything (so a bad ``controller:`` section fails first), attach it to the trainer
they built, then put its final state into their metrics.json::

    controller = build_callback(cfg.controller, stage="dpo")  # None without a controller: section
    trainer = DPOTrainer(...)
    attach_controller(trainer, controller)
    trainer.train()
    write_stage_metrics(out, "dpo", metrics, config, trainer=trainer)  # rlhf_lm.stages.common: controller_report

See docs/controller.md for the policies (rules, online probe-and-commit, learned) and every key.
"""

from __future__ import annotations

from typing import Any

from rlhf_lm.controller.spec import ControllerSpec, controller_objective
from rlhf_lm.errors import ConfigError


def make_policy(spec: ControllerSpec) -> Any:
    from rlhf_lm.controller.policies import make_policy as build

    return build(spec)


def build_callback(spec: dict | ControllerSpec | None, stage: str):
    """A ControllerCallback running the controller described by ``spec`` (a recipe's ``controller:``), or None.
    It is not attached to a trainer yet: see :func:`attach_controller`."""
    if not spec:
        return None
    from rlhf_lm.controller.callback import ControllerCallback

    objective = controller_objective(stage)
    parsed = spec if isinstance(spec, ControllerSpec) else ControllerSpec.from_dict(spec)
    policy = make_policy(parsed)
    if getattr(policy, "probes", False) and objective != "loss":
        raise ConfigError(f"controller.policy '{parsed.policy}' probes candidates on a held-out loss, which stage "
                          f"'{stage}' does not have; use policy 'rules' or 'learned' there.")
    return ControllerCallback(parsed, stage, policy)


def attach_controller(trainer: Any, callback: Any) -> Any:
    """Attach ``callback`` (from :func:`build_callback`; None: no controller) to ``trainer``, built and not yet
    training. Stages build the callback before loading anything, so a bad ``controller:`` section fails first."""
    return callback.attach(trainer) if callback is not None else None


def controller_report(trainer: Any) -> dict[str, Any] | None:
    """The controller's final state and decision history, the ``controller`` entry of a stage's metrics.json; None
    without a controller."""
    from rlhf_lm.controller.callback import ControllerCallback
    from rlhf_lm.controller.handle import TrainerHandle

    callback = TrainerHandle.find_callback(trainer, ControllerCallback)
    return callback.report() if callback is not None else None


__all__ = ["ControllerSpec", "attach_controller", "build_callback", "controller_report", "controller_objective",
           "make_policy"]
