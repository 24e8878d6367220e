"""Every recipe in the repository parses into its stage's config (or plans as a pipeline), and says how to launch it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlhf_lm.configs import load_recipe, parse_config
from rlhf_lm.pipeline import build_config, plan_pipeline
from rlhf_lm.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml"))
LAUNCH = re.compile(r"(?:rlhf-lm|-m rlhf_lm) (\w+) .*--config (\S+\.yaml)")


def launch_commands(path: Path) -> list[tuple[str, str]]:
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    return [m.groups() for line in header if (m := LAUNCH.search(line))]


def test_there_are_recipes_for_real_use():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    assert "quickstart.yaml" in names
    for folder in ("hh_rlhf", "ultrafeedback", "prompts"):
        assert any(n.startswith(folder + "/") for n in names)
    text = "\n".join(p.read_text() for p in RECIPES)
    assert "Qwen/Qwen2.5" in text and "meta-llama/Meta-Llama-3" in text and "load_in_4bit: true" in text


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_parses_and_has_its_launch_command(path, tmp_path):
    commands = launch_commands(path)
    assert commands, f"{path.name}: put the launch command in a header comment"
    rel = path.relative_to(ROOT).as_posix()
    assert any(config == rel for _, config in commands), f"{path.name}: the header's command should use {rel}"
    for command, _ in commands:
        assert command in STAGES or command in ("pipeline", "quickstart"), command
    for accelerate_config in re.findall(r"--config_file (\S+)", path.read_text()):
        assert (ROOT / accelerate_config).is_file(), accelerate_config

    recipe = load_recipe(path)
    if "stages" in recipe:
        plan = plan_pipeline(recipe, source=rel, output_dir=str(tmp_path / "run"))
        assert [s.name for s in plan.stages] == [str(s) for s in recipe["stages"]]
        for stage in plan.stages:  # each stage's resolved values build its config (all checks in __post_init__)
            build_config(stage, rel)
    else:
        (command, _), = {c for c in commands if c[0] in STAGES and c[1] == rel}
        cfg = parse_config(STAGES[command].config_class, ["--config", str(path)])
        for key, value in recipe.items():  # the recipe's numbers reached the config (stages may normalise strings)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert getattr(cfg, key) == value, key
