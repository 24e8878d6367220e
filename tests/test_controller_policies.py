"""Policies are built from one table and say themselves whether they probe; the callback never reads their names."""

from __future__ import annotations

from pathlib import Path

from rlhf_lm.controller import build_callback
from rlhf_lm.controller.policies import POLICY_BUILDERS, make_policy
from rlhf_lm.controller.spec import POLICIES, ControllerSpec

CONTROLLER = Path(__file__).resolve().parents[1] / "rlhf_lm" / "controller"


def test_every_policy_name_has_a_builder_and_says_whether_it_probes():
    assert set(POLICY_BUILDERS) == set(POLICIES)
    probes = {name: make_policy(ControllerSpec(policy=name)).probes for name in POLICIES}
    assert probes == {"rules": False, "online": True, "learned": False}


def test_only_a_probing_policy_gets_the_probe_loop():
    assert build_callback({"policy": "online"}, "dpo").prober is not None
    assert build_callback({"policy": "rules"}, "dpo").prober is None


def test_the_callback_and_the_probe_loop_do_not_branch_on_policy_names():
    for module in ("callback.py", "probe.py", "handle.py"):
        source = (CONTROLLER / module).read_text()
        assert not any(f'"{name}"' in source for name in POLICIES), module
