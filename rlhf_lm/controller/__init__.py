"""The hyperparameter controller: an agent that watches training and steers LR, beta / KL and LoRA layer groups.

Stages call :func:`build_callback` with the recipe's ``controller:`` mapping and pass the result to their trainer::

    callback = build_callback(cfg.controller, stage="dpo")
    trainer = DPOTrainer(..., callbacks=[callback] if callback else None)

See docs/controller.md for the policies (rules, online probe-and-commit, learned) and every key.
"""

from __future__ import annotations

from typing import Any

from rlhf_lm.controller.spec import ControllerSpec
from rlhf_lm.errors import ConfigError


def make_policy(spec: ControllerSpec) -> Any:
    from rlhf_lm.controller.policies import LearnedPolicy, RulesPolicy

    if spec.policy == "learned":
        policy = LearnedPolicy.load(spec.weights)
        policy.increase_damping = spec.increase_damping
        return policy
    # online uses the rules between probes (plateau / adaptive KL / layer schedule)
    return RulesPolicy(spec.plateau_patience, spec.plateau_factor, spec.plateau_threshold, spec.control_lr,
                       spec.kl_target, spec.kl_horizon, spec.layer_schedule)


def build_callback(spec: dict | None, stage: str):
    """A TrainerCallback running the controller described by ``spec`` (a recipe's ``controller:``), or None."""
    if not spec:
        return None
    from rlhf_lm.controller.callback import ControllerCallback

    objective = controller_objective(stage)
    parsed = spec if isinstance(spec, ControllerSpec) else ControllerSpec.from_dict(spec)
    if parsed.policy == "online" and objective != "loss":
        raise ConfigError(f"controller.policy 'online' probes candidates on a held-out loss, which stage '{stage}' "
                          "does not have; use policy 'rules' or 'learned' there.")
    return ControllerCallback(parsed, stage, make_policy(parsed))


def controller_objective(stage: str) -> str:
    """What the controller measures in ``stage``, from its entry in :data:`rlhf_lm.stages.STAGES` (or a custom stage
    module's ``CONTROLLER``): "loss" on a held-out batch, or the logged "reward"."""
    from rlhf_lm.stages import STAGES, get_stage

    objective = get_stage(stage).controller if stage in STAGES or "." in stage else None
    if objective is None:
        steered = [name for name, entry in STAGES.items() if entry.controller]
        raise ConfigError(f"The controller does not know stage '{stage}'; stages: {', '.join(steered)}.")
    return objective


__all__ = ["ControllerSpec", "build_callback", "controller_objective", "make_policy"]
