"""``rlhf-lm push RUN_DIR --repo_id you/name``: push a run to the Hugging Face Hub with a generated model card.

A run directory is either one stage's output (an adapter or model, its tokenizer, metrics.json) or a pipeline run
(``pipeline.json`` plus one folder per stage). The push uploads, in ONE commit, the policy adapters, the PPO value
head, the reward model with its score head, tokenizers, metrics and samples - one sub-folder per stage for a
pipeline - plus a README.md model card (base model, datasets, recipe, metrics, library versions, how to load).
Trainer checkpoints, optimizer states and pickled training args stay local.

The repository is private unless ``--public``. The token comes from ``HF_TOKEN`` or ``hf auth login`` (read by
huggingface_hub); this module never prints or writes it. ``HF_ENDPOINT`` points the client at another Hub.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml

from rlhf_lm.artifacts import METRICS_FILE, OUTPUT_MARKER
from rlhf_lm.errors import ArtifactError, ConfigError, HubError
from rlhf_lm.json_files import read_json_object
from rlhf_lm.stages import STAGES

logger = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"  # same name as rlhf_lm.pipeline.PIPELINE_FILE (not imported: keeps push light)
# Training state that is large, machine-specific or pickled: never pushed.
EXCLUDED_PARTS = re.compile(r"(^|/)(checkpoint-\d+|[^/]+\.partial|[^/]+\.old|runs|__pycache__)(/|$)")
EXCLUDED_FILES = {"optimizer.pt", "scheduler.pt", "training_args.bin", "trainer_state.json", "scaler.pt",
                  OUTPUT_MARKER}
NOT_AN_ADAPTER = "the reward is not a reward-stage LoRA adapter"  # rlhf_lm.shared_reward's reason (not imported)
LIBRARIES = ("rlhf-lm", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub")


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when it gets no answer: offline mode, refused / timed-out connections. The HTTP
    library depends on the huggingface_hub version (httpx2, httpx or requests), so each is looked up if present."""
    import importlib

    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            loaded = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(loaded, name) for name in names if hasattr(loaded, name)]
    return tuple(errors)


# ------------------------------------------------------------------------------------------------- checks
def check_repo_id(repo_id: str | None) -> str:
    """A clear error for a malformed repo id (the Hub's own rules, via huggingface_hub's validator)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id:
        raise ConfigError("No repo id: pass --repo_id you/model-name (or set hub_repo_id in the recipe).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"'{repo_id}' is not a valid Hub repo id: use 'name' or 'namespace/name' with letters, "
                          f"digits, '-', '_' and '.' (max 96 characters). ({e})") from None
    return repo_id


def resolve_token(token: str | None = None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ConfigError("No Hugging Face token found. Set the HF_TOKEN environment variable or run "
                          "`hf auth login` (a token with write access), then push again.")
    return token


# ---------------------------------------------------------------------------------------------- the run
def stage_dirs(run_dir: Path) -> dict[str, Path]:
    """Stage name -> folder for a pipeline run (every sub-folder with metrics.json); {"": run_dir} for one stage."""
    if (run_dir / METRICS_FILE).is_file():
        return {"": run_dir}
    found = {p.name: p for p in sorted(run_dir.iterdir()) if p.is_dir() and (p / METRICS_FILE).is_file()}
    if not found:
        raise ArtifactError(f"{run_dir} is not a finished run: expected {METRICS_FILE} (one stage's output) or "
                            f"sub-folders with {METRICS_FILE} (a pipeline run). Did the run finish?")
    return found


def files_to_push(run_dir: Path) -> list[tuple[Path, str]]:
    """(local file, path in repo) for every file worth publishing."""
    out = []
    for prefix, folder in stage_dirs(run_dir).items():
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if not path.is_file() or EXCLUDED_PARTS.search(rel) or path.name in EXCLUDED_FILES:
                continue
            if path.name.endswith(".tmp") or path.name == "README.md":
                continue
            out.append((path, f"{prefix}/{rel}" if prefix else rel))
    for extra in ("summary.json", "training_curves.png", "samples.jsonl"):
        if (run_dir / extra).is_file():
            out.append((run_dir / extra, extra))
    return out


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _looks_like_hub_id(value: Any) -> bool:
    return isinstance(value, str) and not os.path.exists(value) and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", value))


def _portable(value: Any, run_dir: Path) -> Any:
    """Config values with the local run path replaced by '.', so the card shows no machine-specific paths."""
    if isinstance(value, dict):
        return {k: _portable(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, run_dir) for v in value]
    if isinstance(value, str):
        # The path the pipeline was given.
        recorded = (read_json_object(run_dir / PIPELINE_FILE) or {}).get("output_dir")
        for root in sorted({str(run_dir.resolve()), str(run_dir), recorded or str(run_dir)}, key=len, reverse=True):
            if value == root or value.startswith(root.rstrip("/") + "/"):
                return "." + value[len(root.rstrip("/")):]
    return value


# ---------------------------------------------------------------------------------------------- model card
def _describe(folder: Path) -> str:
    if (folder / "adapter_config.json").is_file():
        task_type = (read_json_object(folder / "adapter_config.json") or {}).get("task_type")
        kind = "reward model (LoRA adapter + score head)" if task_type == "SEQ_CLS" else "policy (LoRA adapter)"
    elif (folder / "config.json").is_file():
        kind = "model (full weights)"
    elif (folder / "base_policy").is_dir():
        kind = "built-in task: data + base policy"
    else:
        kind = "metrics"
    if any(folder.glob("value_head*")):
        kind += " + value head"
    return kind


def _load_snippet(repo_id: str, stages: dict[str, Path], base: str) -> str:
    lines = ["```python", "from huggingface_hub import snapshot_download",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "from peft import PeftModel", "",
             f'local = snapshot_download("{repo_id}")  # add token=... for a private repo']
    for prefix, folder in stages.items():
        sub = f'local + "/{prefix}"' if prefix else "local"
        config = read_json_object(folder / "adapter_config.json") or {}
        if config.get("task_type") == "CAUSAL_LM":
            lines += ["", f"# {prefix or 'policy'}: the LoRA policy adapter on its base model",
                      f"base = AutoModelForCausalLM.from_pretrained({base})",
                      f"policy = PeftModel.from_pretrained(base, {sub})",
                      f"tokenizer = AutoTokenizer.from_pretrained({sub})"]
        elif config.get("task_type") == "SEQ_CLS":
            lines += ["", f"# {prefix or 'reward'}: the reward model (base + adapter + score head), scoring text",
                      "from rlhf_lm.rewards import ClassifierReward",
                      f"reward = ClassifierReward.from_pretrained({sub})",
                      'scores = reward(["Describe the cat.\\n"], ["the cat is happy ."])']
        elif any("ForCausalLM" in a
                 for a in (read_json_object(folder / "config.json") or {}).get("architectures") or []):
            lines += ["", f"# {prefix or 'policy'}: a fully fine-tuned policy",
                      f"policy = AutoModelForCausalLM.from_pretrained({sub})",
                      f"tokenizer = AutoTokenizer.from_pretrained({sub})"]
        if any(folder.glob("value_head*.safetensors")):
            head = next(folder.glob("value_head*.safetensors")).name
            lines += [f'# {prefix or "ppo"}: the value head (a state dict for the trunk\'s last hidden state)',
                      "from safetensors.torch import load_file",
                      f'value_head = load_file({sub} + "/{head}")']
    lines.append("```")
    return "\n".join(lines)


def _reward_layout_lines(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """One line per online stage on how its reward model was held: shared with the policy's base, or separate."""
    lines = []
    for prefix, values in metrics.items():
        layout = (values.get("run") or {}).get("reward_layout") or {}
        stage = f"`{prefix}`" if prefix else "this run"
        if layout.get("shared_base"):
            lines.append(f"- **Reward model of {stage}:** shared - the reward stage's LoRA adapter ran as a second, "
                         f"frozen adapter (`{layout.get('adapter_name')}`) on the policy's own base weights, so the "
                         "run held one copy of the base (base weights sha256 "
                         f"`{str(layout.get('base_sha256'))[:16]}`). It is not part of the saved policy adapter.")
        elif layout.get("reason") and layout["reason"] != NOT_AN_ADAPTER:
            lines.append(f"- **Reward model of {stage}:** a separate model ({layout['reason']}).")
    return lines


def _controller_lines(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """A "Controller" section: per stage that ran one, its policy, final LR and beta / KL coefficient, and how many
    decisions it made (from the ``controller`` entry of the stage's metrics.json)."""
    lines = []
    for prefix, values in metrics.items():
        controller = values.get("controller")
        if not isinstance(controller, dict):
            continue
        final = controller.get("final") or {}
        number = {k: f"{v:.4g}" if isinstance(v := final.get(k), (int, float)) else "n/a"
                  for k in ("learning_rate", "lr_multiplier", "beta")}
        stage = f"`{prefix}`" if prefix else "this run"
        lines.append(f"- {stage}: policy `{controller.get('policy')}`, final LR {number['learning_rate']} "
                     f"(x{number['lr_multiplier']} of the recipe's), final beta / KL coefficient {number['beta']}, "
                     f"{final.get('decisions', 0)} decisions (probes: {final.get('probes', 0)}, "
                     f"rollbacks: {final.get('rollbacks', 0)}); every decision is in its metrics.json.")
    if lines:
        lines = ["## Controller", "", "The hyperparameter controller steered these stages (docs/controller.md):", "",
                 *lines, ""]
    return lines


KEY_METRICS = ("eval/win_rate", "eval/gold_win_rate", "eval/gold_reward/policy", "eval/gold_reward/reference",
               "eval/kl", "reward/accuracy", "reward/gold_accuracy", "objective/scores", "objective/kl",
               "task/label_agreement")


def _key_metrics(metrics_json: dict[str, Any], limit: int = 6) -> dict[str, float]:
    """The headline numbers of a stage's metrics.json (its ``metrics`` entry)."""
    final = metrics_json.get("metrics") or {}
    numbers = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    ordered = [k for k in KEY_METRICS if k in numbers] or sorted(numbers)
    return {k: numbers[k] for k in ordered[:limit]}


def model_card(run_dir: Path, repo_id: str) -> str:
    """The README.md for the pushed repo: YAML metadata for the Hub, then what was trained and how to use it."""
    from huggingface_hub import ModelCardData

    stages = stage_dirs(run_dir)
    metrics = {prefix: read_json_object(folder / METRICS_FILE) or {} for prefix, folder in stages.items()}
    configs = {prefix: m.get("config", {}) for prefix, m in metrics.items()}
    bases = {c.get("model_name_or_path") for c in configs.values() if c.get("model_name_or_path")}
    datasets = sorted({c.get("dataset_name") for c in configs.values() if c.get("dataset_name")})
    hub_bases = sorted(b for b in bases if _looks_like_hub_id(b))
    plan = (read_json_object(run_dir / PIPELINE_FILE) or {}).get("stage_plan", [])
    # each folder's stage kind: the pipeline's plan says; else a folder is named after its stage
    kind_of = {**{name: name for name in stages}, **{p["name"]: p["kind"] for p in plan}}
    provided = {name: STAGES[kind].provides if kind in STAGES else () for name, kind in kind_of.items()}
    # tag the kinds of stage that trained a model (a policy or a reward model)
    trained = {kind_of[name] for name, what in provided.items() if {"policy", "reward_model"} & set(what)}
    tags = ["rlhf-lm", "rlhf", "trl", "peft", "lora"] + sorted(trained)
    card_data = ModelCardData(library_name="peft", tags=tags, base_model=hub_bases or None,
                              datasets=[d for d in datasets if _looks_like_hub_id(d)] or None)
    base_text = ", ".join(f"`{_portable(b, run_dir)}`" for b in sorted(bases)) or "see the recipe below"
    base_stage = next((name for name in stages if "base_model" in provided.get(name, ())), None)
    base_arg = (f'"{hub_bases[0]}"' if hub_bases else f'local + "/{base_stage}/base_policy"' if base_stage
                else '"<base>"')

    rows = ["| stage | contents | key metrics |", "|---|---|---|"]
    for prefix, folder in stages.items():
        top = ", ".join(f"{k}={v:.4g}" for k, v in _key_metrics(metrics[prefix]).items())
        rows.append(f"| `{prefix or '.'}` | {_describe(folder)} | {top} |")
    summary = read_json_object(run_dir / "summary.json") or {}
    recipe = {p["name"]: {"stage": p["kind"], **p["values"]} for p in plan} or configs
    versions = _library_versions()
    parts = [
        f"# {repo_id.split('/')[-1]}",
        "",
        "Preference fine-tuning run made with rlhf-lm (reward model, DPO / PPO with LoRA on TRL and Accelerate).",
        "",
        f"- **Base model:** {base_text}",
        f"- **Datasets:** {', '.join(f'`{_portable(d, run_dir)}`' for d in datasets) or 'see the recipe'}",
        *_reward_layout_lines(metrics),
        "",
        "## What is in this repository",
        "",
        *rows,
        "",
    ]
    parts += _controller_lines(metrics)
    if summary:
        parts += ["## Summary", "", "```json", json.dumps(summary, indent=2, sort_keys=True), "```", ""]
    parts += ["## How to load", "", _load_snippet(repo_id, stages, base_arg), "",
              "## Recipe", "", "The resolved configuration of each stage:", "", "```yaml",
              yaml.safe_dump(_portable(recipe, run_dir), sort_keys=False, default_flow_style=False).rstrip(),
              "```", "", "## Library versions", "", *[f"- {k}: {v}" for k, v in versions.items()], ""]
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(parts)


# ------------------------------------------------------------------------------------------------------ push
def push_run(run_dir: str | Path, repo_id: str, *, private: bool = True, token: str | None = None,
             commit_message: str | None = None) -> str | None:
    """Create the repo (private by default, kept if it exists) and upload the run in one commit; returns its URL.

    Under Accelerate only the main process pushes (the others return None).
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"Run directory not found: {run_dir}.")
    check_repo_id(repo_id)
    files = files_to_push(run_dir)
    token = resolve_token(token)
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    card = model_card(run_dir, repo_id).encode()
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for path, rel in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    if (run_dir / PIPELINE_FILE).is_file():  # the run record, with local paths made relative to the run
        record = _portable(read_json_object(run_dir / PIPELINE_FILE) or {}, run_dir)
        record["source"] = str(record.get("source", "")).split("/")[-1]  # the recipe's file name, not its path
        operations.append(CommitOperationAdd(path_in_repo=PIPELINE_FILE,
                                             path_or_fileobj=json.dumps(record, indent=2).encode()))
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_url.repo_id, operations=operations,
                                   commit_message=commit_message or f"Upload {run_dir.name} with rlhf-lm")
    except unreachable_errors() as e:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        why = ("offline mode is on (HF_HUB_OFFLINE=1)" if type(e).__name__ == "OfflineModeIsEnabled"
               else f"{type(e).__name__}: {e}")
        raise HubError(f"Push to '{repo_id}' failed: the Hugging Face Hub at {endpoint} is unreachable ({why}). "
                       f"Nothing was uploaded; {run_dir} is unchanged. Check the network (or HF_ENDPOINT / "
                       "HF_HUB_OFFLINE) and push again.") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = {401: " The token was rejected: check HF_TOKEN / `hf auth login`.",
                403: f" The token cannot write to '{repo_id}': check its permissions and the namespace."}
        raise ConfigError(f"Push to '{repo_id}' failed: {e}.{hint.get(status, '')}") from None
    logger.info("Pushed %d files from %s to %s", len(operations), run_dir, commit.commit_url)
    return str(repo_url)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rlhf-lm push", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="A stage output directory or a pipeline run directory.")
    parser.add_argument("--repo_id", "--repo-id", required=True, help="Target repo: 'namespace/name' or 'name'.")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True,
                            help="Create the repo as private (default).")
    visibility.add_argument("--public", dest="private", action="store_false", help="Create the repo as public.")
    parser.add_argument("--commit_message", "--commit-message", default=None, help="Commit message.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = push_run(args.run_dir, args.repo_id, private=args.private, commit_message=args.commit_message)
    if url:
        print(f"Pushed {args.run_dir} to {url} ({'private' if args.private else 'public'})")
    return 0
