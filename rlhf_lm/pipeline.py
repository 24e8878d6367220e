"""``rlhf-lm pipeline``: run the stages of one recipe in order, each picking up the artifacts of the ones before.

A pipeline recipe is flat YAML::

    output_dir: runs/hh                 # each stage writes <output_dir>/<stage name> unless its section says otherwise
    stages: [reward, ppo, evaluate]     # run in this order
    model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct   # shared keys: given to every stage whose config has the field
    seed: 0
    reward:                             # a section per stage: that stage's config keys (they win over shared keys)
      learning_rate: 1.0e-4
    eval_ppo:                           # a stage whose name is not its kind says `stage: <kind>`
      stage: evaluate
      inputs: {policy: ppo}             # which earlier stage provides an input (default: the latest that has one)

How artifacts flow (only into fields the user left unset, and only if the stage's config has that field):

=================  ====================================================================================
task               base policy -> ``model_name_or_path``; its pairs / prompts -> ``dataset_name`` + splits,
                   held-out prompts -> ``prompts``; ``gold: true`` where a stage can score with the gold reward
reward             its output directory -> ``reward_model``
dpo/ppo/grpo/rloo  their output directory (adapter or model) -> ``policy_path`` of a later (evaluate) stage
=================  ====================================================================================

A stage is finished when its output directory holds ``metrics.json`` (stages write it last, through
``staged_output``), and a re-run skips it - unless it is forced (``--force`` / ``force: true`` for all,
``--force dpo,ppo`` / ``force: [dpo]`` for some) or an input it depends on was rebuilt in this run. A failing stage
leaves every finished output as it was; fix the cause and re-run to continue where it stopped.

``push_to_hub: true`` (with ``hub_repo_id``) pushes the run at the end through :mod:`rlhf_lm.hub`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from typing import Any

from rlhf_lm.artifacts import METRICS_FILE
from rlhf_lm.config_parsing import config_from_dict, load_recipe, read_override
from rlhf_lm.errors import ArtifactError, ConfigError
from rlhf_lm.json_files import read_json, write_json
from rlhf_lm.pipeline_plan import Pipeline, StagePlan, fields_of, plan_pipeline
from rlhf_lm.redaction import redact
from rlhf_lm.stages import get_stage

logger = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"

# ------------------------------------------------------------------------------------------------- running
def is_finished(stage: StagePlan) -> bool:
    return (stage.output_dir / METRICS_FILE).is_file()


def _check_inputs(stage: StagePlan, by_name: dict[str, StagePlan]) -> None:
    for input_name, provider in stage.inputs.items():
        if not is_finished(by_name[provider]):
            raise ArtifactError(f"Stage '{stage.name}' needs the {input_name.replace('_', ' ')} from stage "
                                f"'{provider}', but {by_name[provider].output_dir} holds no finished result "
                                f"({METRICS_FILE} missing). Run '{provider}' first (or re-run the whole pipeline).")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _distributed_state():
    """Accelerate's process state. PartialState is a singleton shared with the stages' trainers, so create it the way
    they will (transformers passes cpu=True when ACCELERATE_USE_CPU is set; a plain PartialState() would not)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _wait_for_everyone() -> None:
    _distributed_state().wait_for_everyone()


def build_config(stage: StagePlan, source: str = "the recipe"):
    """A stage's config object from its resolved values, read as a stage recipe's are (``config_from_dict``: the
    same key checks and value conversion), then through the stage dataclass's own checks."""
    config_cls = get_stage(stage.kind, source).config_class
    return config_from_dict(config_cls, stage.values, f"section '{stage.name}' of {source}")


def run_stage(stage: StagePlan, source: str = "the recipe", history: list | None = None,
              replace: bool = False) -> dict[str, float]:
    """Build one stage's config and run the stage in this process; ``replace`` lets it replace its finished output
    (a forced stage, or one whose inputs were rebuilt)."""
    entry = get_stage(stage.kind, source)
    if replace and "overwrite_output_dir" in fields_of(entry.config_class):
        stage = dataclasses.replace(stage, values={**stage.values, "overwrite_output_dir": True})
    cfg = build_config(stage, source)
    from rlhf_lm.stages.common import log_history_recorder  # the stage loads transformers anyway

    return entry.run(cfg, callbacks=[log_history_recorder(history)] if history is not None else [])


def _free_memory() -> None:
    """Release the finished stage's models before the next stage loads its own. Trainers, callbacks and models hold
    each other in reference cycles, which Python frees only at its next cyclic collection: until then a pipeline
    would keep the previous stage's weights (and on GPU its cached blocks) next to the new ones."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_pipeline(pipeline: Pipeline) -> dict[str, dict[str, Any]]:
    """Run (or skip, when finished) each stage in order; return each stage's metrics, keyed by stage name."""
    log = logger.info if _is_main_process() else logger.debug  # one copy of the progress lines, not one per rank
    by_name = {s.name: s for s in pipeline.stages}
    old_record = pipeline.output_dir / PIPELINE_FILE
    previous = read_json(old_record) if old_record.is_file() else {}
    rebuilt: set[str] = set()
    results: dict[str, dict[str, Any]] = {}
    # The process group the stages really ran in (1 if torchrun ranks failed to join one group).
    record: dict[str, Any] = {"source": pipeline.source, "output_dir": str(pipeline.output_dir),
                              "num_processes": _distributed_state().num_processes, "stages": {}}
    for stage in pipeline.stages:
        stale = sorted(set(stage.inputs.values()) & rebuilt)
        if is_finished(stage) and stage.name not in pipeline.force and not stale:
            log("Stage %s (%s): finished earlier in %s, skipping (force it to re-run).", stage.name,
                stage.kind, stage.output_dir)
            changed = _changed_keys(previous, stage)
            if changed:
                logger.warning("Stage %s finished with other settings for %s than this recipe gives; its output is "
                               "kept. Re-run it with --force %s.", stage.name, changed, stage.name)
            results[stage.name] = _final_metrics(stage)
            _print_summary(stage, results[stage.name], seconds=None)
            record["stages"][stage.name] = {"kind": stage.kind, "status": "skipped", "seconds": 0.0}
            if stage.name in previous.get("log_history", {}):
                record.setdefault("log_history", {})[stage.name] = previous["log_history"][stage.name]
            continue
        _check_inputs(stage, by_name)
        why = "forced" if stage.name in pipeline.force else f"inputs rebuilt by {stale}" if stale else "not run yet"
        log("Stage %s (%s): running (%s) -> %s", stage.name, stage.kind, why, stage.output_dir)
        start = time.perf_counter()
        try:
            history: list = []
            results[stage.name] = dict(run_stage(stage, pipeline.source, history,
                                                 replace=stage.name in pipeline.force or bool(stale)))
            # kept once: in the stage's metrics.json when it saves the history itself, else here (only the main
            # process writes the record, and only it is sure to find metrics.json written by now)
            if history and _is_main_process() and not read_json(stage.output_dir / METRICS_FILE).get("log_history"):
                record.setdefault("log_history", {})[stage.name] = history
        except Exception:
            logger.error("Stage %s failed. Finished stages and any previous %s are untouched; fix the cause and "
                         "re-run the pipeline to continue from this stage.", stage.name, stage.output_dir)
            raise
        _free_memory()
        _wait_for_everyone()
        seconds = time.perf_counter() - start
        rebuilt.add(stage.name)
        record["stages"][stage.name] = {"kind": stage.kind, "status": "ran", "seconds": round(seconds, 2)}
        _print_summary(stage, results[stage.name], seconds)

    # A skipped stage keeps the settings it really ran with, so a later run can still tell they differ.
    ran_with = {p["name"]: p for p in previous.get("stage_plan", [])}
    record["stage_plan"] = [ran_with[s.name] if record["stages"][s.name]["status"] == "skipped" and s.name in ran_with
                            else {"name": s.name, "kind": s.kind, "inputs": s.inputs, "values": s.values}
                            for s in pipeline.stages]
    record["metrics"] = results
    if _is_main_process():
        pipeline.output_dir.mkdir(parents=True, exist_ok=True)
        write_json(pipeline.output_dir / PIPELINE_FILE, record)
        if pipeline.push_to_hub:
            from rlhf_lm.hub import push_run

            push_run(pipeline.output_dir, pipeline.hub_repo_id, private=pipeline.hub_private)
    return results


def _print_summary(stage: StagePlan, metrics: dict[str, Any], seconds: float | None) -> None:
    """A readable line per finished stage (seconds None: finished in an earlier run), from the main process only.
    (Imported here: rlhf_lm.progress loads transformers, which running a stage does anyway.)"""
    from rlhf_lm.progress import stage_summary

    status = f"done in {seconds:.0f} s" if seconds is not None else "finished earlier"
    if _is_main_process():
        print(stage_summary(stage.name, stage.kind, metrics, status), flush=True)


def _changed_keys(previous_record: dict[str, Any], stage: StagePlan) -> list[str]:
    """Config keys whose value differs from the one this stage last ran with (per the previous pipeline.json)."""
    before = next((p["values"] for p in previous_record.get("stage_plan", []) if p["name"] == stage.name), None)
    if before is None:
        return []
    now = redact(json.loads(json.dumps(stage.values, default=str)))  # the record holds secrets redacted
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))


def _final_metrics(stage: StagePlan) -> dict[str, Any]:
    """A finished stage's final numbers: the ``metrics`` entry of its metrics.json (one schema for every stage,
    :data:`rlhf_lm.stages.common.METRICS_SCHEMA`)."""
    metrics = read_json(stage.output_dir / METRICS_FILE).get("metrics")
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{stage.output_dir / METRICS_FILE} has no 'metrics' mapping: a stage writes it with "
                            "rlhf_lm.stages.common.write_stage_metrics. Re-run the stage with --force "
                            f"{stage.name}.")
    return metrics


# ------------------------------------------------------------------------------------------------------- CLI
def _parse_override(key: str, value: str, recipe: dict[str, Any]) -> None:
    """``--dpo.beta 0.2`` sets a key in section ``dpo``; ``--seed 1`` sets a shared key (values: ``read_override``)."""
    parsed = read_override(value)
    if "." in key:
        section, sub = key.split(".", 1)
        target = recipe.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--{key}: '{section}' is not a stage section.")
        target[sub] = parsed
    else:
        recipe[key] = parsed


def parse_args(argv: list[str] | None) -> tuple[dict[str, Any], str, str | None]:
    parser = argparse.ArgumentParser(
        prog="rlhf-lm pipeline",
        description="Run the stages of a pipeline recipe in order. Extra flags override recipe keys: "
                    "--seed 1 (shared), --dpo.beta 0.2 (one stage).")
    parser.add_argument("--config", required=True, help="Pipeline recipe (YAML) with `stages:`.")
    parser.add_argument("--output_dir", "--output-dir", default=None, help="Run directory (overrides the recipe).")
    parser.add_argument("--force", nargs="?", const="all", default=None,
                        help="Re-run finished stages: all (no value) or a comma-separated list of stage names.")
    args, rest = parser.parse_known_args(argv)
    recipe = load_recipe(args.config)
    i = 0
    while i < len(rest):
        flag = rest[i]
        if not flag.startswith("--"):
            raise ConfigError(f"Unexpected argument '{flag}'. Overrides look like --key value or --stage.key value.")
        key, eq, value = flag[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ConfigError(f"{flag} needs a value.")
            value, i = rest[i + 1], i + 1
        _parse_override(key.replace("-", "_"), value, recipe)
        i += 1
    if args.force == "all":
        recipe["force"] = True
    elif args.force:
        recipe["force"] = args.force.split(",")
    return recipe, args.config, args.output_dir


def main(argv: list[str] | None = None) -> int:
    recipe, source, output_dir = parse_args(argv)
    pipeline = plan_pipeline(recipe, source=f"recipe {source}", output_dir=output_dir)
    run_pipeline(pipeline)  # prints a line per stage as it finishes; every metric is in pipeline.json
    if _is_main_process():
        print(f"Run directory: {pipeline.output_dir}")
    return 0
