"""rlhf_lm.stages.STAGES is the one list of stages: the CLI, the pipeline, the controller and the plots read it, and
no other module keeps a list of stage names of its own (so adding a stage touches only ``stages/``)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_lm import cli
from rlhf_lm.errors import ConfigError
from rlhf_lm.pipeline import plan_pipeline
from rlhf_lm.stages import ARTIFACTS, STAGES, Stage, StageEntry, get_stage

ROOT = Path(__file__).resolve().parents[1]
# Modules that used to keep their own per-stage tables (cli.py, pipeline.py, the controller, the plots, the card).
READERS = ["rlhf_lm/cli.py", "rlhf_lm/pipeline.py", "rlhf_lm/pipeline_plan.py", "rlhf_lm/plotting.py", "rlhf_lm/hub.py",
           *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "rlhf_lm" / "controller").rglob("*.py"))]


def stage_lists(path: Path) -> list[tuple[int, str]]:
    """Where a module keeps its own knowledge of which stages exist: a tuple, list, set or dict with two or more
    stage names in it, or a stage name compared with a variable named like a stage (``kind in ("ppo", "grpo")``,
    ``stage == "dpo"``). A stage name used once for what it means (``build_callback(spec, stage="dpo")``) is fine."""
    tree = ast.parse(path.read_text())

    def names_in(nodes) -> list[str]:
        return [n.value for n in nodes if isinstance(n, ast.Constant) and n.value in STAGES]

    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(names_in(node.elts)) >= 2:
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Dict) and len(names_in(node.keys)) >= 2:
            found.append((node.lineno, ast.unparse(node)[:80]))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            variables = [ast.unparse(s) for s in sides if isinstance(s, (ast.Name, ast.Attribute))]
            literals = names_in(sides) + [v for s in sides if isinstance(s, (ast.Tuple, ast.List, ast.Set))
                                          for v in names_in(s.elts)]
            if literals and any(w in v.lower() for v in variables for w in ("stage", "kind", "command")):
                found.append((node.lineno, ast.unparse(node)))
    return found


@pytest.mark.parametrize("path", READERS)
def test_no_module_outside_stages_keeps_a_list_of_stages(path):
    found = stage_lists(ROOT / path)
    assert not found, f"{path} keeps its own stage names {found}: read rlhf_lm.stages.STAGES instead"


def test_the_check_above_sees_each_kind_of_stage_list(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Docstrings may say dpo and ppo."""\nPOLICY = ("dpo", "ppo")\nHELP = {"task": 1, "dpo": 2}\n'
                      'a = kind in ("grpo",)\nb = stage.kind == "rloo"\nc = "task" in stages\n'
                      'ok = build(stage="dpo")\nkeys = ("reward", "accuracy")\n')
    assert [line for line, _ in stage_lists(module)] == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_is_a_command_and_a_pipeline_stage(name, tmp_path):
    entry = STAGES[name]
    assert entry.name == name and cli.COMMANDS[name] == (entry.module, entry.help) and entry.help
    module = entry.load()
    assert isinstance(module, Stage)
    assert "callbacks" in inspect.signature(module.run).parameters  # the pipeline always passes them
    assert dataclasses.is_dataclass(entry.config_class) and entry.config_class is module.CONFIG
    assert set(entry.provides) <= set(ARTIFACTS)

    plan = plan_pipeline({"stages": [name]}, output_dir=str(tmp_path / "run"))
    assert [(s.name, s.kind) for s in plan.stages] == [(name, name)]
    assert plan.stages[0].values["output_dir"] == str(tmp_path / "run" / name)


def test_the_table_decides_what_flows_between_stages(tmp_path):
    # Each consumer takes its data kind from `reads` and the task's artifacts from `provides`.
    plan = plan_pipeline({"stages": ["task", "reward", "dpo", "ppo", "evaluate"]}, output_dir=str(tmp_path))
    values = {s.name: s.values for s in plan.stages}
    assert values["reward"]["dataset_train_split"] == "pairs_train" and STAGES["reward"].reads == "pairs"
    assert values["ppo"]["dataset_train_split"] == "prompts_train" and STAGES["ppo"].reads == "prompts"
    assert values["ppo"]["reward_model"] == str(tmp_path / "reward")
    assert values["evaluate"]["policy_path"] == str(tmp_path / "ppo")  # the latest stage providing a policy


def test_the_controller_takes_its_objective_from_the_table():
    from rlhf_lm.controller import build_callback, controller_objective

    for name, entry in STAGES.items():
        if entry.controller is None:
            with pytest.raises(ConfigError, match="does not know stage"):
                build_callback({"policy": "rules"}, stage=name)
        else:
            assert controller_objective(name) == entry.controller
            assert build_callback({"policy": "rules"}, stage=name).objective == entry.controller
            if entry.controller != "loss":  # probing needs a held-out loss
                with pytest.raises(ConfigError, match="online"):
                    build_callback({"policy": "online"}, stage=name)


def test_a_custom_stage_module_declares_its_entry_as_module_attributes():
    entry = get_stage("pipeline_stage")  # tests/pipeline_stage.py
    assert entry.provides == ("policy",) and entry.reads == "pairs" and entry.controller is None
    with pytest.raises(ConfigError, match="Did you mean 'reward'"):
        get_stage("rewrd")
    with pytest.raises(ConfigError, match="provides"):
        StageEntry("x", "x", provides=("weights",))


def test_help_imports_no_stage_module():
    code = ("import sys, runpy; sys.argv = ['rlhf-lm', '--help']\n"
            "try:\n    runpy.run_module('rlhf_lm', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in sys.modules if m.startswith(('trl', 'transformers', 'rlhf_lm.stages.'))]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out
