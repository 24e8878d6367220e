"""Controller policies: pure functions of the feature dict (rules, learned) and the probe-and-commit planner."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rlhf_lm.controller.policies.base import Decision, Policy
from rlhf_lm.controller.policies.learned import LearnedPolicy
from rlhf_lm.controller.policies.online import OnlinePolicy, ProbePlanner
from rlhf_lm.controller.policies.rules import RulesPolicy

if TYPE_CHECKING:
    from rlhf_lm.controller.spec import ControllerSpec


def _rules(spec: ControllerSpec, kind: type[RulesPolicy] = RulesPolicy) -> RulesPolicy:
    return kind(spec.plateau_patience, spec.plateau_factor, spec.plateau_threshold, spec.control_lr,
                spec.kl_target, spec.kl_horizon, spec.layer_schedule)


def _learned(spec: ControllerSpec) -> LearnedPolicy:
    policy = LearnedPolicy.load(spec.weights)
    policy.increase_damping = spec.increase_damping
    return policy


# The recipe's ``controller.policy`` -> a function building that policy from the spec (names: spec.POLICIES).
POLICY_BUILDERS = {
    "rules": _rules,
    "online": lambda spec: _rules(spec, OnlinePolicy),
    "learned": _learned,
}


def make_policy(spec: ControllerSpec) -> Policy:
    return POLICY_BUILDERS[spec.policy](spec)


__all__ = ["POLICY_BUILDERS", "Decision", "LearnedPolicy", "OnlinePolicy", "Policy", "ProbePlanner", "RulesPolicy",
           "make_policy"]
