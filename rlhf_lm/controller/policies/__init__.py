"""Controller policies: pure functions of the feature dict (rules, learned) and the probe-and-commit planner."""

from rlhf_lm.controller.policies.base import Decision, Policy
from rlhf_lm.controller.policies.learned import LearnedPolicy
from rlhf_lm.controller.policies.online import ProbePlanner
from rlhf_lm.controller.policies.rules import RulesPolicy

__all__ = ["Decision", "LearnedPolicy", "Policy", "ProbePlanner", "RulesPolicy"]
