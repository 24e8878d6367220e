"""Hub push against a local stand-in for the Hub's HTTP API (tests/hub_server.py): the real huggingface_hub client
uploads the run, downloads it back, and the adapter loads with PeftModel.from_pretrained and gives identical
outputs. Bad input (malformed repo id, no token, a rejected token, a folder that is no run) fails clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import HubStandIn

from rlhf_lm.errors import ConfigError
from rlhf_lm.hub import check_repo_id
from rlhf_lm.json_files import write_json

TOKEN = "hf_stand_in_secret_token"
TEXTS = ["Describe the cat and the dog.\nthe cat is happy .", "Tell me about the rain.\na cold rain ."] * 20


def _hub_env(hub_url: str | None, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONPATH=str(Path(__file__).parent))
    if hub_url:
        env["HF_ENDPOINT"] = hub_url
    if token:
        env["HF_TOKEN"] = token
    return env


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_lm", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A pipeline-shaped run: a LoRA policy adapter, a LoRA reward model with its score head, checkpoints."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_lm.modeling import build_tiny_model

    root = tmp_path_factory.mktemp("hub")
    base_dir = build_tiny_model(root / "base", TEXTS, hidden_size=32, num_hidden_layers=1)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    run = root / "run"

    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                            LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear",
                                       init_lora_weights=False))
    policy.save_pretrained(run / "dpo")
    tokenizer.save_pretrained(run / "dpo")
    write_json(run / "dpo" / "metrics.json", {"metrics": {"eval/win_rate": 0.7, "eval/kl": 0.1},
                                             "config": {"model_name_or_path": str(base_dir)}})
    (run / "dpo" / "checkpoint-4").mkdir()
    (run / "dpo" / "checkpoint-4" / "optimizer.pt").write_bytes(b"state")

    reward = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1),
                            LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear",
                                       modules_to_save=["score"]))
    reward.save_pretrained(run / "reward")
    tokenizer.save_pretrained(run / "reward")
    write_json(run / "reward" / "metrics.json", {"metrics": {"eval/accuracy": 0.8}, "config": {"model_name_or_path": str(base_dir),
                                                                                  "dataset_name": "Anthropic/hh-rlhf"}})
    (run / "dpo.partial").mkdir()
    (run / "dpo.partial" / "junk.bin").write_bytes(b"x")
    write_json(run / "summary.json", {"dpo/win_rate": 0.7})
    return run


def test_push_round_trip_through_the_real_client(run_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with HubStandIn(token=TOKEN) as hub:
        proc = _cli(["push", str(run_dir), "--repo_id", "test-user/tiny-run"], _hub_env(hub.url, tmp_path / "home"))
        assert proc.returncode == 0, proc.stderr
        assert TOKEN not in proc.stdout + proc.stderr
        repo = hub.repos["test-user/tiny-run"]
        assert repo.private  # private by default
        files = set(repo.files)
        assert {"dpo/adapter_model.safetensors", "dpo/adapter_config.json", "dpo/tokenizer.json",
                "reward/adapter_model.safetensors", "README.md", "summary.json"} <= files
        assert not any("checkpoint-" in f or "partial" in f or f.endswith("optimizer.pt") for f in files)
        # every write carried the token; nothing was sent without it
        assert all(auth == f"Bearer {TOKEN}" for method, _, auth in hub.requests if method == "POST")

        # the score head travels with the reward adapter
        from safetensors import safe_open

        (tmp_path / "r.safetensors").write_bytes(repo.files["reward/adapter_model.safetensors"])
        with safe_open(tmp_path / "r.safetensors", "pt") as f:
            assert any("score" in k for k in f.keys())

        card = repo.files["README.md"].decode()
        meta = yaml.safe_load(card.split("---")[1])
        assert meta["library_name"] == "peft" and "dpo" in meta["tags"] and "reward" in meta["tags"]
        assert meta["datasets"] == ["Anthropic/hh-rlhf"]
        for text in ("How to load", "PeftModel.from_pretrained", "transformers:", "trl:", "peft:",
                     "eval/win_rate", "Recipe"):
            assert text in card
        assert str(run_dir) not in card and TOKEN not in card

        # download with the real client (a fresh process, as a user would) and load the adapter back
        download = tmp_path / "download"
        code = ("from huggingface_hub import snapshot_download; "
                f"print(snapshot_download('test-user/tiny-run', local_dir={str(download)!r}))")
        proc = subprocess.run([sys.executable, "-c", code], env=_hub_env(hub.url, tmp_path / "home2"),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr

    base_dir = json.loads((run_dir / "dpo" / "adapter_config.json").read_text())["base_model_name_or_path"]
    inputs = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "dpo")
        pulled = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), download / "dpo")
        plain = AutoModelForCausalLM.from_pretrained(base_dir)
        out_original, out_pulled = original(inputs).logits, pulled(inputs).logits
        assert torch.equal(out_original, out_pulled)
        assert not torch.allclose(out_pulled, plain(inputs).logits)  # the adapter really is applied


def test_push_again_updates_the_same_repo(run_dir, tmp_path):
    with HubStandIn(token=TOKEN) as hub:
        env = _hub_env(hub.url, tmp_path / "home")
        assert _cli(["push", str(run_dir / "dpo"), "--repo-id", "tiny-dpo", "--public"], env).returncode == 0
        proc = _cli(["push", str(run_dir / "dpo"), "--repo-id", "tiny-dpo", "--public"], env)
        assert proc.returncode == 0, proc.stderr
        repo = hub.repos["test-user/tiny-dpo"]
        assert not repo.private and len(repo.commits) == 2
        assert "adapter_model.safetensors" in repo.files  # a single stage's output goes to the repo root


@pytest.mark.parametrize("repo_id", ["bad id with spaces", "a/b/c", "-leading", "x" * 100, ""])
def test_malformed_repo_id(repo_id):
    with pytest.raises(ConfigError, match="repo id"):
        check_repo_id(repo_id)


def test_bad_input_from_the_cli(run_dir, tmp_path):
    with HubStandIn(token=TOKEN) as hub:
        no_token = _cli(["push", str(run_dir), "--repo_id", "test-user/x"], _hub_env(hub.url, tmp_path / "h",
                                                                                      token=None))
        assert no_token.returncode == 2 and "No Hugging Face token" in no_token.stderr
        wrong = _cli(["push", str(run_dir), "--repo_id", "test-user/x"], _hub_env(hub.url, tmp_path / "h",
                                                                                   token="hf_wrong"))
        assert wrong.returncode == 2 and "token was rejected" in wrong.stderr and "hf_wrong" not in wrong.stderr
        malformed = _cli(["push", str(run_dir), "--repo_id", "not a/valid id"], _hub_env(hub.url, tmp_path / "h"))
        assert malformed.returncode == 2 and "not a valid Hub repo id" in malformed.stderr
        (tmp_path / "empty").mkdir()
        not_run = _cli(["push", str(tmp_path / "empty"), "--repo_id", "test-user/x"], _hub_env(hub.url, tmp_path))
        assert not_run.returncode == 2 and "is not a finished run" in not_run.stderr
        assert hub.repos == {}
        for proc in (no_token, wrong, malformed, not_run):
            assert "Traceback" not in proc.stderr


def test_push_to_hub_from_a_pipeline_recipe(tmp_path):
    """`push_to_hub: true` pushes the finished run at the end of `rlhf-lm pipeline` (the task's base policy here)."""
    recipe = {"output_dir": str(tmp_path / "run"), "stages": ["task"], "push_to_hub": True,
              "hub_repo_id": "test-user/pipeline-run",
              "task": {"num_pretrain_texts": 100, "num_train_pairs": 16, "num_eval_pairs": 8, "pretrain_epochs": 1,
                       "hidden_size": 16, "num_hidden_layers": 1}}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(recipe))
    with HubStandIn(token=TOKEN) as hub:
        proc = _cli(["pipeline", "--config", str(tmp_path / "pipe.yaml")], _hub_env(hub.url, tmp_path / "home"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        repo = hub.repos["test-user/pipeline-run"]
        assert repo.private
        assert {"pipeline.json", "README.md", "task/base_policy/model.safetensors", "task/metrics.json"} <= set(
            repo.files)
        assert TOKEN not in proc.stdout + proc.stderr
        record = repo.files["pipeline.json"].decode()  # the run record is pushed without local paths
        assert str(tmp_path) not in record and json.loads(record)["stage_plan"][0]["values"]["output_dir"] == "./task"
