"""Every recipe in recipes/ runs: each is started exactly as a user starts it and trains for a step or two.

``rlhf-lm <stage> --config <recipe> [--key value ...]`` is ``parse_config(STAGES[stage].config_class, argv)`` then the
stage's ``run(cfg)``; ``rlhf-lm pipeline --config <recipe> ...`` is ``parse_args`` + ``plan_pipeline`` +
``run_pipeline``. Both are called here with the recipe file itself and a short, explicit list of overrides per recipe
that only (1) swaps what cannot be had offline - the model (SmolLM2-135M-Instruct, ``real_model_dir``, for the Qwen /
Llama checkpoints; the built-in task's tiny policy for recipes/builtin), the dataset (a handful of rows in the
dataset's own format and split names), a reward model that another recipe writes - and (2) shrinks sizes (steps,
batches, lengths, tokens sampled). Everything else is the recipe's own: dtype, LoRA keys, loss settings,
``report_to: tensorboard``, length modes, adaptive KL, activation checkpointing, save / eval schedules.

Each run checks its artifact (a LoRA adapter whose B factors all trained, a full model that moved, a value head,
``metrics.json``; for pipelines ``pipeline.json`` with every stage run and, where the recipe pushes, the push), that
the recipe's own values reached the run, and that TensorBoard event files hold scalars where the recipe logs there.
QLoRA recipes need bitsandbytes on a CUDA GPU: on CPU they must stop, before the model loads, with one line that says
why; on a GPU (``-m gpu``) they run. The reward models PPO / GRPO need are the reward recipes' own runs (once each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_lm.configs import load_recipe, parse_config
from rlhf_lm.errors import ConfigError, RlhfError
from rlhf_lm.pipeline import parse_args, plan_pipeline, run_pipeline
from rlhf_lm.pipeline_plan import PIPELINE_KEYS
from rlhf_lm.stages import STAGES

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TOKEN = "hf_stand_in_secret_token"

# ------------------------------------------------------------------------------------------------------- data
# (question, a polite answer, a rude non-answer): chosen / rejected replies a few steps can tell apart.
QA = [
    ("What is the capital of France?", "The capital of France is Paris.", "Look it up yourself."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Who cares about spiders?"),
    ("What do bees make?", "Bees make honey.", "Stop bothering me."),
    ("What is two plus two?", "Two plus two is four.", "Use your fingers."),
    ("Which planet do we live on?", "We live on planet Earth.", "What a stupid question."),
    ("What is frozen water called?", "Frozen water is called ice.", "I am not your teacher."),
    # held out (test splits)
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue.", "Go outside and look."),
    ("How many days are in a week?", "A week has seven days.", "Count them yourself."),
]
TRAIN, TEST = QA[:6], QA[6:]
GREETING = [("Human", "Hi, can I ask you something?"), ("Assistant", "Of course, go ahead.")]
# One HH dialogue longer than the max_length used here (~250 tokens as chat): the recipes' length_mode decides its fate.
SMALL_TALK = [("Human", "I had a long day at work and I am tired of meetings, emails and spreadsheets."),
              ("Assistant", "That sounds exhausting. Taking a short walk or a break can help you recharge.")] * 4


def hh_dialogue(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def hh_rows(items, history=GREETING) -> list[dict]:
    """Anthropic/hh-rlhf rows: two whole dialogues that differ only in the last Assistant turn."""
    rows = []
    for question, good, bad in items:
        turns = [*history, ("Human", question)]
        rows.append({"chosen": hh_dialogue([*turns, ("Assistant", good)]),
                     "rejected": hh_dialogue([*turns, ("Assistant", bad)])})
    return rows


def ultrafeedback_rows(items) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized rows: the prompt as text, chosen / rejected as message lists that repeat
    it, the whole chosen chat in `messages`, and the scores."""
    rows = []
    for i, (question, good, bad) in enumerate(items):
        user = {"role": "user", "content": question}
        chosen = [user, {"role": "assistant", "content": good}]
        rows.append({"prompt": question, "prompt_id": f"{i:064x}", "chosen": chosen,
                     "rejected": [user, {"role": "assistant", "content": bad}], "messages": chosen,
                     "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def hh_data(tmp_path_factory) -> Path:
    """Anthropic/hh-rlhf's splits (train, test) as a directory: a directory dataset reads `<split>.jsonl`."""
    root = tmp_path_factory.mktemp("hh_rlhf")
    write_jsonl(root / "train.jsonl", hh_rows(TRAIN) + hh_rows(TRAIN[:1], history=GREETING + SMALL_TALK))
    write_jsonl(root / "test.jsonl", hh_rows(TEST))
    return root


@pytest.fixture(scope="module")
def ultrafeedback_data(tmp_path_factory) -> Path:
    """ultrafeedback_binarized's splits: train_prefs / test_prefs (pairs), train_gen / test_gen (prompts)."""
    root = tmp_path_factory.mktemp("ultrafeedback")
    for kind in ("prefs", "gen"):
        write_jsonl(root / f"train_{kind}.jsonl", ultrafeedback_rows(TRAIN))
        write_jsonl(root / f"test_{kind}.jsonl", ultrafeedback_rows(TEST))
    return root


# ------------------------------------------------------------------------------------------- what changes, per recipe
# What each recipe run changes, and nothing else. An argument "{name}" is filled in when the run starts: the path of
# a fixture (model, data) or of another recipe's run (a reward model). Every run also gets its own --output_dir.
HH_REWARD = "hh_rlhf/reward_qwen2.5_0.5b_lora.yaml"
BUILTIN_REWARD = "builtin/reward.yaml"
REAL = ["--model_name_or_path", "{real_model}"]  # SmolLM2-135M-Instruct for Qwen2.5 / Llama-3 (no Hub here)
TINY = ["--model_name_or_path", "{tiny_policy}"]  # the built-in task's base policy (runs/task/base_policy)

# Two steps: the recipes that warm up spend their first step at learning rate 0. Evaluation and checkpointing
# happen once, at the last step, on the recipe's own schedule type.
STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
PAIRS = [*STEPS, "--per_device_eval_batch_size", "2", "--max_length", "128"]
ONCE = ["--eval_steps", "2", "--save_steps", "2"]
DPO_EVAL = ["--eval_num_prompts", "2", "--eval_max_new_tokens", "8"]  # DPO's closing policy-vs-reference samples
# One PPO iteration (the recipes' schedules do not warm up): a rollout of 2 and the recipe's update epochs on it.
PPO = ["--max_steps", "1", "--rollout_batch_size", "2", "--per_device_train_batch_size", "2",
       "--gradient_accumulation_steps", "1", "--per_device_eval_batch_size", "2", "--max_new_tokens", "8"]
ONLINE = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--num_generations", "2",
          "--max_completion_length", "8"]  # GRPO / RLOO: one prompt x 2 completions per step

# recipe -> (stage command of its header, overrides)
RUNS: dict[str, tuple[str, list[str]]] = {
    HH_REWARD: ("reward", [*REAL, "--dataset_name", "{hh_data}", *PAIRS, *ONCE]),
    "hh_rlhf/dpo_qwen2.5_0.5b_lora.yaml": ("dpo", [*REAL, "--dataset_name", "{hh_data}", *PAIRS, *ONCE, *DPO_EVAL]),
    "hh_rlhf/ppo_qwen2.5_0.5b_lora.yaml": (
        "ppo", [*REAL, "--dataset_name", "{hh_data}", "--reward_model", "{hh_reward}", *PPO, "--save_steps", "1"]),
    "ultrafeedback/dpo_qwen2.5_1.5b_lora.yaml": (
        "dpo", [*REAL, "--dataset_name", "{ultrafeedback_data}", *PAIRS, *ONCE, *DPO_EVAL]),
    "ultrafeedback/dpo_llama3_8b_full.yaml": (
        "dpo", [*REAL, "--dataset_name", "{ultrafeedback_data}", *PAIRS, *ONCE, *DPO_EVAL]),
    # The prompt recipes' reward model is the QLoRA Llama-3-8B one (GPU only): the HH reward recipe's run stands in.
    "prompts/ppo_qwen2.5_0.5b_lora.yaml": (
        "ppo", [*REAL, "--dataset_name", "{ultrafeedback_data}", "--reward_model", "{hh_reward}", *PPO,
                "--save_steps", "1"]),
    "prompts/grpo_qwen2.5_0.5b_lora.yaml": (
        "grpo", [*REAL, "--dataset_name", "{ultrafeedback_data}", "--reward_model", "{hh_reward}", *ONLINE,
                 "--save_steps", "2"]),
    # The built-in task's recipes on the tiny task (the recipes' own data layout: runs/task/data).
    BUILTIN_REWARD: ("reward", [*TINY, "--dataset_name", "{tiny_data}", *PAIRS, "--max_eval_samples", "4"]),
    # Two pairs, so the recipe's 2 epochs are 2 steps and DPO precomputes the reference as it does for 2 epochs.
    "builtin/dpo.yaml": ("dpo", [*TINY, "--dataset_name", "{tiny_data}", "--max_train_samples", "2",
                                 "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
                                 "--max_eval_samples", "4", *DPO_EVAL]),
    "builtin/ppo.yaml": ("ppo", [*TINY, "--dataset_name", "{tiny_prompts}", "--reward_model", "{builtin_reward}",
                                 *PPO]),
    "builtin/grpo.yaml": ("grpo", [*TINY, "--dataset_name", "{tiny_prompts}", "--reward_model", "{builtin_reward}",
                                   *ONLINE]),
    "builtin/rloo.yaml": ("rloo", [*TINY, "--dataset_name", "{tiny_prompts}", "--reward_model", "{builtin_reward}",
                                   *ONLINE]),
}


def in_section(stage: str, overrides: list[str]) -> list[str]:
    """The same overrides for one stage of a pipeline (``--dpo.max_steps 2``)."""
    return [f"--{stage}.{a[2:]}" if a.startswith("--") else a for a in overrides]


PIPELINES: dict[str, list[str]] = {
    # push_to_hub: true stays; the push goes to the Hub stand-in (tests/hub_server.py), into the recipe's own repo id.
    "hh_rlhf/pipeline_ppo_qwen2.5_1.5b.yaml": [
        *REAL, "--dataset_name", "{hh_data}",
        *in_section("reward", [*STEPS, "--max_length", "128", "--save_steps", "2"]),
        *in_section("ppo", [*PPO, "--save_steps", "1"]),
        "--evaluate.num_prompts", "2", "--evaluate.max_new_tokens", "8"],
    "ultrafeedback/pipeline_dpo_qwen2.5_1.5b.yaml": [
        *REAL, "--dataset_name", "{ultrafeedback_data}",
        *in_section("reward", [*STEPS, "--max_length", "128"]),
        *in_section("dpo", [*STEPS, "--max_length", "128", *DPO_EVAL]),
        "--evaluate.num_prompts", "2", "--evaluate.max_new_tokens", "8"],
}

QLORA: dict[str, tuple[str, list[str]]] = {  # 4-bit base (bitsandbytes, CUDA)
    "hh_rlhf/dpo_qwen2.5_1.5b_qlora.yaml": ("dpo", ["--dataset_name", "{hh_data}", *PAIRS, *ONCE, *DPO_EVAL]),
    "ultrafeedback/dpo_llama3_8b_qlora.yaml": (
        "dpo", ["--dataset_name", "{ultrafeedback_data}", *PAIRS, *ONCE, *DPO_EVAL]),
    "ultrafeedback/reward_llama3_8b_qlora.yaml": (
        "reward", ["--dataset_name", "{ultrafeedback_data}", *PAIRS, *ONCE]),
}


# ------------------------------------------------------------------------------------------------------ running
@pytest.fixture(scope="module")
def start(request, tmp_path_factory, hh_data, ultrafeedback_data) -> Callable[[str], Path]:
    """``start(recipe)`` runs a single-stage recipe of RUNS once per module and returns its output directory."""
    done: dict[str, Path] = {}

    def tiny_task() -> Path:
        return request.getfixturevalue("tiny_task_dir")

    sources: dict[str, Callable[[], Path]] = {
        "real_model": lambda: request.getfixturevalue("real_model_dir"),
        "tiny_policy": lambda: tiny_task() / "base_policy",
        "tiny_data": lambda: tiny_task() / "data",
        "tiny_prompts": lambda: tiny_task() / "data" / "prompts_train.jsonl",
        "hh_data": lambda: hh_data,
        "ultrafeedback_data": lambda: ultrafeedback_data,
        "hh_reward": lambda: run(HH_REWARD),
        "builtin_reward": lambda: run(BUILTIN_REWARD),
    }

    def run(recipe: str) -> Path:
        if recipe not in done:
            command, overrides = RUNS[recipe]
            out = tmp_path_factory.mktemp(recipe.replace("/", "_").removesuffix(".yaml")) / "run"
            module = STAGES[command].load()
            cfg = parse_config(module.CONFIG, ["--config", str(RECIPES / recipe), "--output_dir", str(out),
                                               *fill(overrides, sources)])
            module.run(cfg)
            done[recipe] = out
        return done[recipe]

    return run


def fill(args: list[str], sources: dict[str, Callable[[], Path]]) -> list[str]:
    return [str(sources[a[1:-1]]()) if a.startswith("{") and a.endswith("}") else a for a in args]


def overridden(overrides: list[str]) -> set[str]:
    return {a[2:] for a in overrides if a.startswith("--")}


# ---------------------------------------------------------------------------------------------------- checks
def assert_lora_trained(out: Path, heads: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The adapter holds LoRA factors (and the named heads) only, and every LoRA B - zero at init - trained."""
    adapter = load_file(out / "adapter_model.safetensors")
    assert all("lora_" in k or any(f".{h}." in k for h in heads) for k in adapter), sorted(adapter)[:5]
    for head in heads:
        assert any(f".{head}." in k for k in adapter), f"the {head} head is missing from {out}"
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), \
        [k for k, v in lora_b.items() if v.abs().sum() == 0][:5]
    return adapter


def assert_tensorboard(out: Path) -> None:
    """TensorBoard event files under the stage's output dir, holding the training scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(out.rglob("events.out.tfevents.*"))
    assert files, f"report_to: tensorboard, but no event file under {out}"
    tags = set()
    for f in files:
        events = EventAccumulator(str(f))
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    assert tags, f"the TensorBoard event files in {out} hold no scalars"


def assert_recipe_reached_the_run(recipe: dict, config: dict, changed: set[str]) -> None:
    """Every number, flag and name the recipe sets (and the overrides do not) is what the run recorded."""
    for key, value in recipe.items():
        if key in changed or isinstance(value, (dict, list)):
            continue
        recorded = config[key]
        if isinstance(value, str) and isinstance(recorded, list):  # report_to, loss_type are lists in TRL
            recorded = ",".join(map(str, recorded))
        assert recorded == value, f"{key}: the recipe says {value!r}, the run recorded {recorded!r}"


def metrics_of(out: Path) -> dict:
    assert (out / "metrics.json").is_file(), f"{out} holds no metrics.json: the stage did not finish"
    assert not out.with_name(out.name + ".partial").exists()
    return json.loads((out / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------------------ tests
def test_every_recipe_is_started_here():
    everything = {p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.yaml")} - {"quickstart.yaml"}
    assert set(RUNS) | set(PIPELINES) | set(QLORA) == everything  # a new recipe needs a run here
    for recipe in everything:
        assert (recipe in QLORA) == bool(load_recipe(RECIPES / recipe).get("load_in_4bit")), recipe


@pytest.mark.parametrize("recipe", list(RUNS))
def test_recipe_runs(recipe, start, request):
    command, overrides = RUNS[recipe]
    values = load_recipe(RECIPES / recipe)
    out = start(recipe)
    saved = metrics_of(out)
    assert_recipe_reached_the_run(values, saved["config"], overridden(overrides) | {"output_dir"})

    if command == "dpo" and not values.get("use_peft", True):  # a full fine-tune: the whole model, and it moved
        assert not (out / "adapter_model.safetensors").exists()
        trained = load_file(out / "model.safetensors")
        base = load_file(request.getfixturevalue("real_model_dir") / "model.safetensors")
        assert set(trained) == set(base)
        assert all(t.dtype == getattr(torch, values["dtype"]) for t in trained.values())
        # Moved, not every tensor: in one process the bf16 weights are updated in bf16, where a 5e-7 step rounds
        # away for all but ~0.3% of the elements (ZeRO-3 / FSDP2, the recipe's launchers, keep fp32 master weights).
        assert any(not torch.equal(t, base[k].to(t.dtype)) for k, t in trained.items()), "the weights never moved"
    else:
        assert_lora_trained(out, heads=("score",) if command == "reward" else ())
    if command == "ppo":
        assert load_file(out / "value_head.safetensors")["bias"].abs().sum() > 0  # the bias starts at zero
        assert saved["run"]["episodes"] == 2
    if command in ("reward", "dpo"):
        assert not list(out.glob("checkpoint-*")), "the finished artifact keeps no resume state"
    if command == "reward":  # scored its held-out pairs and its training responses
        assert "reward/accuracy" in saved["metrics"] and saved["run"]["reward_std"] > 0
    if command == "dpo":
        # Reference log-probs are computed once when training visits the data more than once (builtin: 2 epochs).
        assert saved["config"]["precompute_ref_log_probs"] == (values["num_train_epochs"] > 1)
        # The closing evaluation: held-out pairs, and samples of policy and reference on held-out prompts.
        assert "eval/implicit_accuracy" in saved["metrics"] and saved["metrics"]["eval/num_prompts"] == 2
        assert len(read_jsonl(out / "samples.jsonl")) == 2

    if values.get("report_to") == "tensorboard":
        assert_tensorboard(out)
    else:
        assert not list(out.rglob("events.out.tfevents.*"))

    if recipe.startswith("hh_rlhf/"):  # the long dialogue meets max_length: the recipe's length handling counts it
        data = saved["data"]["train"]
        if command in ("dpo", "reward"):  # length_mode truncate_prompt: its earliest turns cut, the pair kept
            assert sum(data["truncated"].values()) == 1 and data["rows_out"] == len(TRAIN) + 1, data


def run_pipeline_in_process(recipe: str, out: Path, overrides: list[str]) -> None:
    """`rlhf-lm pipeline --config <recipe> --output_dir <out> <overrides>`, in this process."""
    recipe_dict, source, output_dir = parse_args(["--config", str(RECIPES / recipe), "--output_dir", str(out),
                                                  *overrides])
    run_pipeline(plan_pipeline(recipe_dict, source=f"recipe {source}", output_dir=output_dir))


def assert_pipeline_ran(out: Path, recipe: dict, overrides: list[str]) -> dict:
    """Every stage ran, with the recipe's shared keys (in the stages that have the field) and its section's values."""
    record = json.loads((out / "pipeline.json").read_text())
    assert {name: s["status"] for name, s in record["stages"].items()} == dict.fromkeys(recipe["stages"], "ran")
    changed = overridden(overrides)
    shared = {k: v for k, v in recipe.items() if k not in PIPELINE_KEYS and k not in recipe["stages"]}
    for stage in recipe["stages"]:
        config = json.loads((out / stage / "metrics.json").read_text())["config"]
        values = {**{k: v for k, v in shared.items() if k in config}, **recipe.get(stage, {})}
        mine = {k for k in changed if "." not in k} | {k.split(".", 1)[1] for k in changed if k.startswith(f"{stage}.")}
        assert_recipe_reached_the_run(values, config, mine | {"output_dir"})
    return record


def test_ultrafeedback_dpo_pipeline_runs(real_model_dir, ultrafeedback_data, tmp_path):
    recipe = "ultrafeedback/pipeline_dpo_qwen2.5_1.5b.yaml"
    sources = {"real_model": lambda: real_model_dir, "ultrafeedback_data": lambda: ultrafeedback_data}
    out = tmp_path / "run"
    run_pipeline_in_process(recipe, out, fill(PIPELINES[recipe], sources))

    record = assert_pipeline_ran(out, load_recipe(RECIPES / recipe), PIPELINES[recipe])
    assert_lora_trained(out / "reward", heads=("score",))
    assert_lora_trained(out / "dpo")
    for stage in ("reward", "dpo"):
        assert_tensorboard(out / stage)
    evaluate = next(p for p in record["stage_plan"] if p["name"] == "evaluate")
    assert evaluate["values"]["policy_path"] == str(out / "dpo")
    assert evaluate["values"]["reward_model"] == str(out / "reward")
    # The held-out prompts are the DPO run's own (its test_prefs), as chat messages - the layout DPO trained on.
    samples = read_jsonl(out / "evaluate" / "samples.jsonl")
    assert [s["prompt"] for s in samples] == [[{"role": "user", "content": q}] for q, _, _ in TEST]
    assert all("reward_policy" in s["scores"] for s in samples)


def hub_env(hub_url: str, home: Path) -> dict[str, str]:
    """The environment of a user's process that talks to the Hub stand-in (as tests/test_hub.py sets it up)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_ENDPOINT=hub_url, HF_TOKEN=TOKEN)
    return env


def test_hh_ppo_pipeline_runs_and_pushes(real_model_dir, hh_data, tmp_path):
    from hub_server import HubStandIn

    recipe = "hh_rlhf/pipeline_ppo_qwen2.5_1.5b.yaml"
    values = load_recipe(RECIPES / recipe)
    sources = {"real_model": lambda: real_model_dir, "hh_data": lambda: hh_data}
    out = tmp_path / "run"
    # A process of its own, as a user starts it: the Hub client reads its endpoint and token when it is imported.
    argv = [sys.executable, "-m", "rlhf_lm", "pipeline", "--config", str(RECIPES / recipe), "--output_dir", str(out),
            *fill(PIPELINES[recipe], sources)]
    with HubStandIn(token=TOKEN) as hub:
        proc = subprocess.run(argv, env=hub_env(hub.url, tmp_path / "home"), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert TOKEN not in proc.stdout + proc.stderr
        repo = hub.repos[values["hub_repo_id"]]
        assert repo.private == values["hub_private"]
        assert {"README.md", "pipeline.json", "reward/adapter_model.safetensors", "ppo/adapter_model.safetensors",
                "ppo/value_head.safetensors", "evaluate/samples.jsonl", "evaluate/metrics.json"} <= set(repo.files)

    assert_pipeline_ran(out, values, PIPELINES[recipe])
    assert_lora_trained(out / "reward", heads=("score",))
    assert_lora_trained(out / "ppo")
    for stage in ("reward", "ppo"):
        assert_tensorboard(out / stage)
    # The evaluation judged the PPO policy on the held-out HH prompts as chat messages, the layout PPO trained on.
    samples = read_jsonl(out / "evaluate" / "samples.jsonl")
    assert len(samples) == 2 and all(isinstance(s["prompt"], list) for s in samples), samples[0]["prompt"]
    assert all(s["prompt"][-1] == {"role": "user", "content": q} for s, (q, _, _) in zip(samples, TEST))


@pytest.fixture(scope="module")
def checkpoint_without_weights(real_model_dir, tmp_path_factory) -> Path:
    """The real checkpoint's config, tokenizer and generation config, but no weights: a stage that tried to load the
    model would fail on the missing weights, so a QLoRA error from it proves the check came first."""
    out = tmp_path_factory.mktemp("no_weights")
    for f in real_model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (out / f.name).symlink_to(f)
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the QLoRA recipes run (test_qlora_recipe_runs)")
@pytest.mark.parametrize("recipe", list(QLORA))
def test_qlora_recipe_stops_before_loading_the_model_on_cpu(recipe, checkpoint_without_weights, hh_data,
                                                            ultrafeedback_data, tmp_path):
    command, overrides = QLORA[recipe]
    sources = {"hh_data": lambda: hh_data, "ultrafeedback_data": lambda: ultrafeedback_data}
    module = STAGES[command].load()
    cfg = parse_config(module.CONFIG, ["--config", str(RECIPES / recipe), "--output_dir", str(tmp_path / "run"),
                                       "--model_name_or_path", str(checkpoint_without_weights),
                                       *fill(overrides, sources)])
    with pytest.raises(RlhfError) as error:
        module.run(cfg)
    assert isinstance(error.value, ConfigError), repr(error.value)
    message = str(error.value)
    assert "\n" not in message and "load_in_4bit" in message and "CUDA" in message, message
    assert not (tmp_path / "run").exists()  # nothing claims to be a finished result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
@pytest.mark.parametrize("recipe", list(QLORA))
def test_qlora_recipe_runs(recipe, real_model_dir, hh_data, ultrafeedback_data, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install 'rlhf-lm[quantization]'")
    command, overrides = QLORA[recipe]
    sources = {"hh_data": lambda: hh_data, "ultrafeedback_data": lambda: ultrafeedback_data}
    module = STAGES[command].load()
    out = tmp_path / "run"
    cfg = parse_config(module.CONFIG, ["--config", str(RECIPES / recipe), "--output_dir", str(out),
                                       "--model_name_or_path", str(real_model_dir), *fill(overrides, sources)])
    module.run(cfg)
    saved = metrics_of(out)
    assert_recipe_reached_the_run(load_recipe(RECIPES / recipe), saved["config"],
                                  overridden(overrides) | {"output_dir", "model_name_or_path"})
    assert_lora_trained(out, heads=("score",) if command == "reward" else ())
    assert_tensorboard(out)
