"""Planning a pipeline: a pipeline recipe resolved into stages with complete config values and their inputs.

Nothing runs and no stage module is imported here beyond its config class (``rlhf_lm.pipeline`` runs the plan; its
docstring describes the recipe format and how artifacts flow between stages).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_lm.config_parsing import closest_key, unread_key_error, unread_keys
from rlhf_lm.errors import ConfigError, did_you_mean
from rlhf_lm.stages import STAGES, StageEntry, get_stage, is_known_stage, unknown_stage_error

# The keys of the pipeline recipe itself; every other top-level key is a shared stage key or a stage section.
PIPELINE_KEYS = ("stages", "output_dir", "force", "push_to_hub", "hub_repo_id", "hub_private")
SECTION_KEYS = ("stage", "inputs")  # keys of a stage section that belong to the pipeline, not the stage config


@dataclass
class StagePlan:
    """One stage of a pipeline with its resolved config values and where its inputs come from."""

    name: str
    kind: str
    values: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> providing stage name

    @property
    def output_dir(self) -> Path:
        return Path(self.values["output_dir"])


@dataclass
class Pipeline:
    output_dir: Path
    stages: list[StagePlan]
    force: set[str]
    push_to_hub: bool = False
    hub_repo_id: str | None = None
    hub_private: bool = True
    source: str = "the recipe"


def fields_of(config_cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls) if f.init}


def _artifact_values(stage: StageEntry, fields: set[str], providers: dict[str, StagePlan]) -> dict[str, Any]:
    """Config values that point ``stage`` at the artifacts of the stages before it."""
    values: dict[str, Any] = {}

    def offer(key: str, value: Any) -> None:
        if key in fields:
            values[key] = value

    if "base_model" in providers:
        offer("model_name_or_path", str(providers["base_model"].output_dir / "base_policy"))
    data = {"prompts": "prompt_data", "pairs": "preference_data"}.get(stage.reads)
    if data in providers:
        offer("dataset_name", str(providers[data].output_dir / "data"))
        offer("dataset_train_split", f"{stage.reads}_train")  # the task writes pairs_train.jsonl, prompts_train.jsonl
        offer("dataset_eval_split", f"{stage.reads}_eval")
    if "prompt_data" in providers:
        offer("prompts", str(providers["prompt_data"].output_dir / "data" / "prompts_eval.jsonl"))  # held out
    if "gold" in providers:
        offer("gold", True)
    if "reward_model" in providers:
        offer("reward_model", str(providers["reward_model"].output_dir))
    if "policy" in providers:
        offer("policy_path", str(providers["policy"].output_dir))
    return values


def plan_pipeline(recipe: dict[str, Any], source: str = "the recipe", output_dir: str | None = None) -> Pipeline:
    """Resolve a pipeline recipe into stages with complete config values (nothing is run or imported twice)."""
    recipe = dict(recipe)
    stage_list = recipe.pop("stages", None)
    if not stage_list or not isinstance(stage_list, list):
        raise ConfigError(f"{source} needs `stages:`, a list of stage names, e.g. [task, reward, dpo, evaluate].")
    run_dir = Path(output_dir or recipe.pop("output_dir", None) or "runs/pipeline")
    recipe.pop("output_dir", None)
    force = recipe.pop("force", False)
    push, repo_id, private = recipe.pop("push_to_hub", False), recipe.pop("hub_repo_id", None), recipe.pop(
        "hub_private", True)
    if push and not repo_id:
        raise ConfigError(f"{source}: push_to_hub is true but hub_repo_id is not set (e.g. hub_repo_id: you/my-run).")

    names = [str(s) for s in stage_list]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: a stage name appears twice in `stages`; give repeated kinds their own "
                          "section names (e.g. eval_dpo: {stage: evaluate}).")
    sections = {name: recipe.pop(name) for name in names if name in recipe}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping of config keys, got {section!r}.")

    for name in names:  # unknown kinds fail before any (heavy) stage module is imported
        kind = sections.get(name, {}).get("stage", name)
        if not is_known_stage(kind):
            raise unknown_stage_error(kind, source)

    # What is left at the top level: shared keys, or sections of stages that are not in `stages` (a mistake).
    shared = recipe
    plans: list[StagePlan] = []
    latest: dict[str, StagePlan] = {}  # input name -> the latest stage providing it
    by_name: dict[str, StagePlan] = {}
    used_shared: set[str] = set()
    for name in names:
        section = dict(sections.get(name, {}))
        kind = section.pop("stage", name)
        explicit_inputs = section.pop("inputs", {}) or {}
        entry = get_stage(kind, source)
        fields = fields_of(entry.config_class)
        providers = dict(latest)
        for input_name, provider in explicit_inputs.items():
            if provider not in by_name:
                raise ConfigError(f"{source}: stage '{name}' takes input '{input_name}' from '{provider}', which is "
                                  f"not an earlier stage. Earlier stages: {list(by_name) or 'none'}.")
            offered = get_stage(by_name[provider].kind, source).provides
            if input_name not in offered:
                raise ConfigError(f"{source}: stage '{provider}' ({by_name[provider].kind}) provides "
                                  f"{list(offered)}, not '{input_name}'.")
            providers[input_name] = by_name[provider]
        values = _artifact_values(entry, fields, providers)
        own = {}
        for key, value in shared.items():
            if key in fields:
                own[key] = value
                used_shared.add(key)
        unknown = [k for k in section if k not in fields]
        if unknown and unknown[0] in unread_keys(entry.config_class):
            raise unread_key_error(unknown[0], entry.config_class, f"section '{name}' of {source}")
        if unknown:
            hint = did_you_mean(closest_key(unknown[0], sorted(fields)))
            raise ConfigError(f"Unknown config key '{unknown[0]}' in section '{name}' of {source} (a {kind} stage)."
                              f"{hint}")
        own.update(section)
        # A stage depends on a provider (for re-runs and missing-artifact errors) only through values it kept.
        consumed = {i: p.name for i, p in providers.items() if set(_artifact_values(entry, fields, {i: p})) - set(own)}
        values.update(own)
        values.setdefault("output_dir", str(run_dir / name))
        plan = StagePlan(name=name, kind=kind, values=values, inputs=consumed)
        plans.append(plan)
        by_name[name] = plan
        for provided in entry.provides:
            latest[provided] = plan

    leftover = [k for k in shared if k not in used_shared]
    if leftover:
        key = leftover[0]
        if key in STAGES or isinstance(shared[key], dict) and key != "controller":
            raise ConfigError(f"{source}: section '{key}' is not in `stages` ({names}). Add it there or remove it.")
        every = sorted(set().union(*(fields_of(get_stage(p.kind).config_class) for p in plans)) | set(PIPELINE_KEYS))
        hint = did_you_mean(closest_key(key, every))
        raise ConfigError(f"Unknown config key '{key}' in {source}: no stage of this pipeline ({names}) has it.{hint}")

    if force is True:
        forced = set(names)
    elif not force:
        forced = set()
    else:
        forced = set(force if isinstance(force, list) else str(force).split(","))
        bad = forced - set(names)
        if bad:
            raise ConfigError(f"force names stage(s) {sorted(bad)} that are not in this pipeline ({names}).")
    return Pipeline(run_dir, plans, forced, bool(push), repo_id, bool(private), source)
