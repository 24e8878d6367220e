"""The reward stage end to end: it trains what it should, saves what later stages need, and reloads exactly."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rlhf_lm.artifacts import METRICS_FILE
from rlhf_lm.configs import config_from_dict
from rlhf_lm.errors import ConfigError, DataError, RlhfError
from rlhf_lm.rewards import ClassifierReward, load_reward
from rlhf_lm.stages import reward as reward_stage

REPO = Path(__file__).resolve().parents[1]
GOLD_ACCURACY_REACHED = 0.75  # the target for the built-in task
EVAL_METRICS = ["reward/accuracy", "reward/margin", "reward/ece", "reward/length_baseline_accuracy",
                "reward/prefers_longer", "reward/length_corr"]


def stage_config(task: Path, out: Path, **overrides) -> reward_stage.RewardStageConfig:
    values = dict(model_name_or_path=str(task / "base_policy"), dataset_name=str(task / "data"),
                  dataset_train_split="pairs_train", dataset_eval_split="pairs_eval", output_dir=str(out),
                  learning_rate=3e-3, num_train_epochs=2, per_device_train_batch_size=16, logging_steps=1000,
                  save_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    values.update(overrides)
    return config_from_dict(reward_stage.RewardStageConfig, values, "test")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def digest(directory: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())).hexdigest()


@pytest.fixture(scope="module")
def lora_rm(tiny_task_dir, tmp_path_factory) -> tuple[Path, dict, str]:
    """A LoRA reward model trained on the tiny task (mechanics, not quality), and the base's digest before training."""
    out = tmp_path_factory.mktemp("rm") / "reward"
    before = digest(tiny_task_dir / "base_policy")
    metrics = reward_stage.run(stage_config(tiny_task_dir, out, num_train_epochs=3))
    return out, metrics, before


def test_lora_artifact_holds_adapter_head_tokenizer_and_metrics(lora_rm, tiny_task_dir):
    out, metrics, before = lora_rm
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", METRICS_FILE} <= names
    assert not any(n.startswith("checkpoint-") for n in names)
    assert not (out.parent / "reward.partial").exists()  # staged output was swapped into place
    saved = json.loads((out / METRICS_FILE).read_text())
    for key in EVAL_METRICS + ["reward/gold_accuracy", "reward/train_accuracy"]:
        assert key in saved["metrics"] and key in metrics
    assert saved["run"]["reward_std"] > 0 and "reward_mean" in saved["run"]
    assert saved["data"]["train"]["rows_out"] == 96 and saved["config"]["output_dir"] == str(out)
    assert str(out.parent) not in json.dumps({k: v for k, v in saved.items() if k != "config"})

    adapter = tensors(out / "adapter_model.safetensors")
    head = [k for k in adapter if ".score." in k]
    assert head, f"score head missing from the adapter: {sorted(adapter)[:5]}"
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: every one was trained
    assert all("lora_" in k or ".score." in k for k in adapter)  # nothing of the base is saved (or changed)
    # The fresh head is seeded; training moved it away from its initial value.
    from transformers import set_seed

    from rlhf_lm.modeling import load_sequence_classifier

    set_seed(0)
    init = load_sequence_classifier(str(tiny_task_dir / "base_policy")).score.weight
    assert not torch.allclose(adapter[head[0]], init)
    assert digest(tiny_task_dir / "base_policy") == before  # base weights on disk untouched


def test_reload_reproduces_in_memory_scores(lora_rm, tiny_task_dir):
    out, metrics, _ = lora_rm
    saved = json.loads((out / METRICS_FILE).read_text())
    merged = ClassifierReward.from_pretrained(out)
    unmerged = ClassifierReward.from_pretrained(out, merge=False)
    from datasets import load_dataset

    from rlhf_lm.evaluation import evaluate_pairs

    pairs = load_dataset("json", data_files=str(tiny_task_dir / "data" / "pairs_eval.jsonl"), split="train")
    again = evaluate_pairs(unmerged, pairs, gold=True)
    for key in ("reward/margin", "reward/chosen_mean", "reward/rejected_mean", "reward/gold_accuracy"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-5), key  # metrics were scored in memory
    p, c = pairs["prompt"], pairs["chosen"]
    assert torch.allclose(merged(p, c), unmerged(p, c), atol=1e-5)
    train = load_dataset("json", data_files=str(tiny_task_dir / "data" / "pairs_train.jsonl"), split="train")
    scores = torch.cat([unmerged(train["prompt"], train["chosen"]), unmerged(train["prompt"], train["rejected"])])
    assert scores.mean().item() == pytest.approx(saved["run"]["reward_mean"], abs=1e-5)
    normalized = load_reward(str(out), normalize=True)(list(train["prompt"]), list(train["chosen"]))
    assert torch.allclose(normalized, (scores[:len(train)] - saved["run"]["reward_mean"]) / saved["run"]["reward_std"], atol=1e-5)


def test_cross_tokenizer_reward_scores_text_not_ids(lora_rm, tmp_path, tiny_task_dir):
    """A policy with its own tokenizer is judged by a reward model with another: the reward re-tokenises text."""
    from rlhf_lm.builtin_task.task import all_prompts
    from rlhf_lm.modeling import build_tiny_model, load_causal_lm, load_tokenizer

    out, _, _ = lora_rm
    policy_dir = build_tiny_model(tmp_path / "policy", all_prompts()[:200], arch="qwen2", vocab_size=300, seed=3)
    policy_tok, reward = load_tokenizer(str(policy_dir)), ClassifierReward.from_pretrained(out)
    sample = "Describe the cat and the dog.\nthe cat is happy ."
    assert policy_tok(sample)["input_ids"] != reward.tokenizer(sample)["input_ids"]
    prompts = [json.loads(x)["prompt"] for x in (tiny_task_dir / "data" / "prompts_eval.jsonl").open()][:6]
    evaluation = pytest.importorskip("rlhf_lm.evaluation")
    samples = tmp_path / "samples.jsonl"
    metrics = evaluation.evaluate_policy(load_causal_lm(str(policy_dir)), policy_tok, prompts, reward,
                                         reference=load_causal_lm(str(policy_dir)), samples_path=samples,
                                         max_new_tokens=12, batch_size=6)
    rows = [json.loads(line) for line in samples.open()]
    direct = reward([r["prompt"] for r in rows], [r["policy"] for r in rows])
    assert metrics["eval/reward/policy"] == pytest.approx(direct.mean().item(), abs=1e-5)


@pytest.mark.parametrize("spec", ["reward_models/format_rule.py:format_reward", "reward_models/format_rule.py:FormatRule",
                                  "reward_models/length_penalized.py:LengthPenalized",
                                  "reward_models/ensemble.py:ClassifierPlusFormat"])
def test_reward_model_examples_load_by_spec_and_evaluate(spec, lora_rm, tiny_task_dir, monkeypatch):
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer

    out, _, _ = lora_rm
    monkeypatch.chdir(REPO)
    kwargs = {} if "format_rule" in spec else {"reward_dir": str(out)}
    if "ensemble" in spec:
        kwargs["calibration_file"] = str(tiny_task_dir / "data" / "pairs_train.jsonl")
    reward = load_reward(spec, **kwargs)
    good, bad = "the cat is happy . the dog is kind .", "the cat is happy . the cat is happy . the"
    scores = reward(["Describe the cat and the dog.\n"] * 2, [good, bad])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    if "format_rule" in spec:
        assert scores[0] > scores[1]
    evaluation = pytest.importorskip("rlhf_lm.evaluation")
    policy = str(tiny_task_dir / "base_policy")
    prompts = [json.loads(x)["prompt"] for x in (tiny_task_dir / "data" / "prompts_eval.jsonl").open()][:4]
    metrics = evaluation.evaluate_policy(load_causal_lm(policy), load_tokenizer(policy, padding_side="left"), prompts,
                                         reward, reference=load_causal_lm(policy), max_new_tokens=8, batch_size=4)
    assert "eval/reward/policy" in metrics and metrics["eval/num_prompts"] == 4


def test_encoder_backbone_without_eos_trains_and_reloads(tiny_task_dir, tmp_path):
    """BERT-style tokenizers have no EOS (RewardTrainer needs one): SEP stands in, and the classifier head saves."""
    from transformers import AutoTokenizer

    from rlhf_lm.builtin_task.task import all_prompts
    from rlhf_lm.modeling import build_tiny_model

    texts = [json.loads(x)["chosen"] for x in (tiny_task_dir / "data" / "pairs_train.jsonl").open()] + all_prompts()
    encoder = build_tiny_model(tmp_path / "encoder", texts, arch="bert", vocab_size=300)

    assert AutoTokenizer.from_pretrained(encoder).eos_token is None  # the pitfall is real
    out = tmp_path / "rm"
    metrics = reward_stage.run(stage_config(tiny_task_dir, out, model_name_or_path=str(encoder), num_train_epochs=1))
    assert set(EVAL_METRICS) <= set(metrics)
    adapter = tensors(out / "adapter_model.safetensors")
    assert any(".classifier." in k for k in adapter)
    reloaded = load_reward(str(out))
    assert reloaded.tokenizer.eos_token == "[SEP]"
    assert reloaded(["Describe the cat and the dog.\n"], ["the cat is happy ."]).shape == (1,)


def test_full_finetune_and_merged_adapter_save_whole_models(tiny_task_dir, tmp_path):
    full = tmp_path / "full"
    reward_stage.run(stage_config(tiny_task_dir, full, use_peft=False, max_steps=2))
    merged = tmp_path / "merged"
    reward_stage.run(stage_config(tiny_task_dir, merged, merge_adapter=True, max_steps=2))
    for out in (full, merged):
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        assert load_reward(str(out))(["Describe the cat and the dog.\n"], ["the cat is happy ."]).shape == (1,)
    base = tensors(tiny_task_dir / "base_policy" / "model.safetensors")
    trained = tensors(full / "model.safetensors")
    changed = [k for k in trained if k in base and not torch.equal(trained[k], base[k])]
    assert len(changed) == len([k for k in trained if k in base])  # full fine-tune: every backbone tensor moved


def test_over_long_pairs_are_counted_not_silently_dropped(tiny_task_dir, tmp_path):
    out = tmp_path / "short"
    reward_stage.run(stage_config(tiny_task_dir, out, max_length=24, max_steps=1))
    data = json.loads((out / METRICS_FILE).read_text())["data"]["train"]
    assert sum(data["dropped"].values()) > 0 and data["rows_out"] + sum(data["dropped"].values()) == data["rows_in"]


BAD_CONFIGS = [
    ({"model_name_or_path": None}, ConfigError, "model_name_or_path"),
    ({"merge_adapter": True, "use_peft": False}, ConfigError, "merge_adapter"),
    ({"center_rewards_coefficient": -1.0}, ConfigError, "center_rewards_coefficient"),
    ({"use_liger_kernel": True}, ConfigError, "use_liger_kernel: true is not supported by the reward stage"),
    ({"max_length": 4}, DataError, "max_length"),
    ({"dataset_name": "/nonexistent/pairs.jsonl"}, DataError, "/nonexistent/pairs.jsonl"),
    ({"model_name_or_path": "/nonexistent/model"}, RlhfError, "/nonexistent/model"),
    ({"controller": {"polcy": "rules"}}, ConfigError, "Did you mean 'policy'"),  # the controller is wired in
]


@pytest.mark.parametrize("overrides,error,fragment", BAD_CONFIGS, ids=[next(iter(c[0])) + str(i) for i, c in
                                                                       enumerate(BAD_CONFIGS)])
def test_bad_stage_inputs_fail_clearly(overrides, error, fragment, tiny_task_dir, tmp_path):
    with pytest.raises(error, match=fragment.replace("/", ".")):
        reward_stage.run(stage_config(tiny_task_dir, tmp_path / "x", max_steps=1, **overrides))
    assert not (tmp_path / "x").exists()


def test_backbone_tokenizer_without_eos_or_pad(tiny_task_dir, tmp_path):
    """No EOS, SEP or pad token: the stage says so and names the fix; following the fix (eos_token) works."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(x)["chosen"] for x in (tiny_task_dir / "data" / "pairs_train.jsonl").open()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<end>"]))
    backbone = tmp_path / "bare"
    shutil.copytree(tiny_task_dir / "base_policy", backbone)
    for f in backbone.glob("tokenizer*"):
        f.unlink()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(backbone)
    with pytest.raises(ConfigError, match="no EOS, SEP or pad token") as info:
        reward_stage.run(stage_config(tiny_task_dir, tmp_path / "x", model_name_or_path=str(backbone), max_steps=1))
    assert str(backbone) in str(info.value) and "eos_token" in str(info.value)
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        reward_stage.run(stage_config(tiny_task_dir, tmp_path / "x", model_name_or_path=str(backbone), max_steps=1,
                                      eos_token="<nope>"))
    metrics = reward_stage.run(stage_config(tiny_task_dir, tmp_path / "ok", model_name_or_path=str(backbone),
                                            max_steps=1, eos_token="<end>"))
    assert "reward/accuracy" in metrics
    assert load_reward(str(tmp_path / "ok")).tokenizer.eos_token == "<end>"


def test_cli_prints_one_line_errors(tmp_path, capsys):
    from rlhf_lm.cli import main

    with pytest.raises(SystemExit) as info:
        main(["reward", "--output_dir", str(tmp_path / "x"), "--lora_rr", "8"])
    assert info.value.code == 2 and "lora_r" in capsys.readouterr().err


def test_margin_column_and_reward_centering_enter_the_loss(tiny_task_dir, tmp_path):
    """-log sigmoid(r_c - r_r - margin): with margin 5 the first-step loss is about 5, not log 2; centering adds."""
    rows = [json.loads(x) for x in (tiny_task_dir / "data" / "pairs_train.jsonl").open()][:32]
    data = tmp_path / "margin.jsonl"
    data.write_text("".join(json.dumps({**r, "margin": 5.0}) + "\n" for r in rows))
    common = dict(dataset_name=str(data), dataset_eval_split=None, dataset_train_split="train", eval_fraction=0.25,
                  max_steps=1, per_device_train_batch_size=8, learning_rate=1e-9)
    with_margin = reward_stage.run(stage_config(tiny_task_dir, tmp_path / "m", **common))["train/loss"]
    plain = dict(common, dataset_name=str(tiny_task_dir / "data" / "pairs_train.jsonl"), max_train_samples=24)
    baseline = reward_stage.run(stage_config(tiny_task_dir, tmp_path / "b", **plain))["train/loss"]
    centered = reward_stage.run(stage_config(tiny_task_dir, tmp_path / "c", center_rewards_coefficient=100.0,
                                             **plain))["train/loss"]
    assert baseline == pytest.approx(0.69, abs=0.1)
    assert with_margin == pytest.approx(5.0, abs=0.6)
    assert centered > baseline + 0.05


def test_stage_learns_a_clean_preference(tiny_task_dir, tmp_path):
    """Noise-free pairs (positive vs negative adjective, same noun): a short LoRA run must get held-out pairs right,
    on words combined in ways it never saw."""
    import random

    from rlhf_lm.builtin_task.task import NEGATIVE, POSITIVE, TOPICS

    rng, nouns = random.Random(0), [n for ns in TOPICS.values() for n in ns]
    train_nouns, eval_nouns = nouns[:36], nouns[36:]

    def pairs(noun_pool, n):
        rows = []
        for _ in range(n):
            a, b = rng.sample(noun_pool, 2)
            rows.append({"prompt": f"Describe the {a} and the {b}.\n", "chosen": f"the {a} is {rng.choice(POSITIVE)} .",
                         "rejected": f"the {a} is {rng.choice(NEGATIVE)} ."})
        return rows

    data = tmp_path / "clean"
    data.mkdir()
    for split, rows in (("train", pairs(train_nouns, 256)), ("eval", pairs(eval_nouns, 64))):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = reward_stage.run(stage_config(tiny_task_dir, tmp_path / "rm", dataset_name=str(data),
                                            dataset_train_split="train", dataset_eval_split="eval",
                                            num_train_epochs=3, learning_rate=5e-3, gold_metrics=False))
    assert metrics["reward/accuracy"] >= 0.9, metrics
    assert metrics["reward/margin"] > 0.5


@pytest.mark.slow
def test_builtin_task_recipe_reaches_gold_accuracy(task_dir, tmp_path):
    """The recipe recipes/builtin/reward.yaml on the default task (the target run; see the recipe's header)."""
    from rlhf_lm.configs import load_recipe

    recipe = load_recipe(REPO / "recipes" / "builtin" / "reward.yaml")
    recipe.update(model_name_or_path=str(task_dir / "base_policy"), dataset_name=str(task_dir / "data"),
                  output_dir=str(tmp_path / "rm"))
    metrics = reward_stage.run(config_from_dict(reward_stage.RewardStageConfig, recipe, "recipe"))
    assert metrics["reward/gold_accuracy"] >= GOLD_ACCURACY_REACHED, metrics


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_real_hh_rlhf_pairs_decoder_and_encoder_backbones(hh_pairs_path, tmp_path, arch):
    """Real HH-RLHF dialogues: the stage trains a tiny decoder, and an encoder given as a local directory, and
    reports every metric (no gold here: this is human data)."""
    import gzip

    from rlhf_lm.modeling import build_tiny_model

    with gzip.open(hh_pairs_path, "rt") as f:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(300), f)]
    backbone = build_tiny_model(tmp_path / arch, texts, arch=arch, vocab_size=1000)
    out = tmp_path / "rm"
    metrics = reward_stage.run(config_from_dict(reward_stage.RewardStageConfig, dict(
        model_name_or_path=str(backbone), dataset_name=str(hh_pairs_path), output_dir=str(out), max_length=256,
        max_train_samples=96, max_eval_samples=48, num_train_epochs=1, per_device_train_batch_size=16,
        learning_rate=1e-3, save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=1000), "test"))
    assert set(EVAL_METRICS) <= set(metrics) and "reward/gold_accuracy" not in metrics
    assert all(math.isfinite(metrics[k]) for k in EVAL_METRICS)
    saved = json.loads((out / METRICS_FILE).read_text())
    assert saved["data"]["train"]["rows_in"] == 1800 and saved["run"]["reward_std"] > 0
    assert load_reward(str(out))(["\n\nHuman: hi\n\nAssistant:"], [" Hello! How can I help?"]).shape == (1,)


def test_moved_run_folder_still_finds_its_base(lora_rm, tiny_task_dir, tmp_path, monkeypatch):
    """PEFT records the base path as given at training time; the artifact also records it relative to itself."""
    import shutil

    out, _, _ = lora_rm
    rel = json.loads((out / METRICS_FILE).read_text())["run"]["base_model_relative"]
    moved = tmp_path / "a" / "b" / "reward"
    shutil.copytree(out, moved)
    shutil.copytree(tiny_task_dir / "base_policy", (moved / rel).resolve())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "runs/task/base_policy"  # relative to a working directory we are not in
    (moved / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    p, c = ["Describe the cat and the dog.\n"], ["the cat is happy ."]
    assert torch.allclose(load_reward(str(moved))(p, c), load_reward(str(out))(p, c), atol=1e-6)
    shutil.rmtree((moved / rel).resolve())
    with pytest.raises(RlhfError, match="Cannot find the base model"):
        load_reward(str(moved))


def test_long_conversations_keep_their_last_turns_and_only_impossible_pairs_are_dropped(tmp_path):
    """Measured in the exact tokens RewardTrainer trains on: earlier turns go first (a system message stays), and a
    pair is dropped only when its response does not fit even after the last user turn."""
    from datasets import Dataset

    from rlhf_lm.data import DataReport
    from rlhf_lm.modeling import train_tokenizer
    from rlhf_lm.rewards.layout import fit_pairs_to_length, reward_input_ids

    tok = train_tokenizer(["system user assistant hello there how are you fine thanks bye now"] * 20, vocab_size=300)
    system = {"role": "system", "content": "be kind"}
    turns = [{"role": "user", "content": "hello there " * 5}, {"role": "assistant", "content": "fine thanks " * 5},
             {"role": "user", "content": "how are you"}]
    reply = [{"role": "assistant", "content": "fine"}]
    rows = [{"prompt": [system, *turns], "chosen": reply, "rejected": [{"role": "assistant", "content": "bye now"}]},
            {"prompt": [turns[-1]], "chosen": reply, "rejected": reply[:0] + [{"role": "assistant", "content": "ok"}]},
            {"prompt": [turns[-1]], "chosen": [{"role": "assistant", "content": "hello there " * 40}],
             "rejected": reply}]
    limit = max(len(reward_input_ids([system, turns[-1]], r, tok)) for r in (reply, rows[0]["rejected"]))
    report = DataReport(source="pairs", rows_in=3)
    kept = fit_pairs_to_length(Dataset.from_list(rows), tok, limit, report)
    assert kept["prompt"] == [[system, turns[-1]], [turns[-1]]]
    assert report.truncated == {f"prompt cut from the left to fit max_length={limit}": 1}
    assert sum(report.dropped.values()) == 1 and report.rows_out == 2
    for row in kept:
        assert max(len(reward_input_ids(row["prompt"], row[c], tok)) for c in ("chosen", "rejected")) <= limit
