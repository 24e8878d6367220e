"""The hyperparameter controller: an agent that watches training and steers LR, beta / KL and LoRA layer groups.

Stages build it before loading anything (so a bad ``controller:`` section fails first), attach it to the trainer
they built, then put its final state into their metrics.json::

    controller = build_callback(cfg.controller, stage="dpo")  # None without a controller: section
    trainer = DPOTrainer(...)
    attach_controller(trainer, controller)
    trainer.train()
    write_json(out / "metrics.json", {..., **controller_metrics(trainer)})

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


def controller_metrics(trainer: Any) -> dict[str, Any]:
    """``{"controller": final state + decision history}`` for a stage's metrics.json, or {} without a controller."""
    from rlhf_lm.controller.callback import ControllerCallback
    from rlhf_lm.controller.handle import TrainerHandle

    callback = TrainerHandle.find_callback(trainer, ControllerCallback)
    return {"controller": callback.report()} if callback is not None else {}


__all__ = ["ControllerSpec", "attach_controller", "build_callback", "controller_metrics", "controller_objective",
           "make_policy"]
