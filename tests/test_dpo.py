"""The DPO stage: config checks, tokenization parity with TRL, length accounting, LoRA / SFT-adapter references,
resume, and learning on the built-in task."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from rlhf_lm.configs import config_from_dict, parse_config
from rlhf_lm.data import DataReport
from rlhf_lm.dpo.config import LOSS_TYPES, passes_over_data
from rlhf_lm.errors import ArtifactError, ConfigError, DataError
from rlhf_lm.modeling import load_causal_lm, load_tokenizer
from rlhf_lm.preference_pairs import apply_length_limit, tokenize_pairs
from rlhf_lm.stages.dpo import DPOStageConfig, build_trainer, run


def tiny_cfg(task: Path, out: Path, **overrides) -> DPOStageConfig:
    """A few-step DPO run on the tiny task: the mechanics, not the quality."""
    values = dict(model_name_or_path=str(task / "base_policy"), dataset_name=str(task / "data" / "pairs_train.jsonl"),
                  eval_dataset_name=str(task / "data" / "pairs_eval.jsonl"), output_dir=str(out), use_cpu=True,
                  max_steps=4, per_device_train_batch_size=8, per_device_eval_batch_size=16, learning_rate=1e-2,
                  max_length=96, save_strategy="no", logging_steps=1, disable_tqdm=True, eval_num_prompts=8,
                  eval_max_new_tokens=12, lora_r=4, lora_alpha=8, seed=0)
    values.update(overrides)
    if not values.get("use_peft", True):  # a full fine-tune takes no LoRA keys (they would be ignored: an error)
        values = {k: v for k, v in values.items() if not k.startswith("lora_")}
    return config_from_dict(DPOStageConfig, values)


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------------ bad config
@pytest.mark.parametrize("overrides, match", [
    ({"beta": 0.0}, "beta must be > 0"),
    ({"beta": -0.1}, "beta must be > 0"),
    ({"loss_type": ["sigmod"]}, "Unknown loss_type 'sigmod'. Did you mean 'sigmoid'"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "one weight per loss type"),
    ({"loss_type": ["exo_pair"]}, "label_smoothing > 0"),
    ({"length_mode": "cut"}, "length_mode"),
    ({"use_peft": False, "sft_adapter_path": "x"}, "sft_adapter_path needs use_peft"),
    ({"sft_adapter_path": "x", "ref_model_name_or_path": "y"}, "not both"),
])
def test_bad_config_is_a_clear_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(DPOStageConfig, {"output_dir": "x", **overrides})


def test_cli_flags_parse_and_are_checked():
    cfg = parse_config(DPOStageConfig, ["--loss_type", "sigmoid", "sft", "--loss_weights", "1.0", "0.5",
                                        "--beta", "0.2"])
    assert cfg.loss_type == ["sigmoid", "sft"] and cfg.loss_weights == [1.0, 0.5] and cfg.beta == 0.2
    assert cfg.use_peft and not cfg.gradient_checkpointing and cfg.lora_dropout == 0.0
    with pytest.raises(ConfigError, match="beta"):
        parse_config(DPOStageConfig, ["--beta", "0"])
    with pytest.raises(ConfigError, match="Did you mean 'beta'"):
        parse_config(DPOStageConfig, ["--betta", "0.1"])


def test_loss_types_are_trls():
    import dataclasses

    import trl

    help_text = next(f for f in dataclasses.fields(trl.DPOConfig) if f.name == "loss_type").metadata["help"]
    assert {t for t in LOSS_TYPES} == {t for t in LOSS_TYPES if f"'{t}'" in help_text}
    assert help_text.count("`'") == len(LOSS_TYPES)


# ------------------------------------------------------------------------------------------------ tokenization
def _trl_tokenized(ds: Dataset, tokenizer, max_length=None) -> Dataset:
    import trl

    fake_trainer = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    return trl.DPOTrainer._prepare_dataset(fake_trainer, ds, tokenizer, args, "train")


def test_tokenize_pairs_matches_trl_for_text_and_chat(tiny_task_dir):
    tok = load_tokenizer(str(tiny_task_dir / "base_policy"))
    rows = [json.loads(line) for line in (tiny_task_dir / "data" / "pairs_train.jsonl").read_text().splitlines()]
    text = Dataset.from_list(rows[:40])
    ours, theirs = tokenize_pairs(text, tok), _trl_tokenized(text, tok)
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[col] == theirs[col]
    assert ours["chosen_ids"][0][-1] == tok.eos_token_id
    chat = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"].strip()}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows[:20]])
    ours, theirs = tokenize_pairs(chat, tok), _trl_tokenized(chat, tok)
    for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[col] == theirs[col]


def test_length_limit_counts_every_drop_and_truncation():
    ds = Dataset.from_dict({"prompt_ids": [[1] * 3, [1] * 8, [1] * 3, [1] * 10],
                            "chosen_ids": [[2] * 2, [2] * 1, [2] * 9, [2] * 1],
                            "rejected_ids": [[3] * 4, [3] * 1, [3] * 1, [3] * 1]})
    report = DataReport(source="pairs", rows_in=4)
    kept = apply_length_limit(ds, 8, "drop", report)
    assert [len(p) for p in kept["prompt_ids"]] == [3]
    assert report.dropped == {"prompt alone has >= max_length=8 tokens": 2, "pair over max_length=8": 1}
    report = DataReport(source="pairs", rows_in=4)
    kept = apply_length_limit(ds, 8, "truncate", report)
    assert len(kept) == 2 and report.truncated == {"completion cut at max_length=8": 1}
    assert report.rows_out == 2


def test_long_prompts_are_dropped_and_counted_and_all_too_long_is_an_error(tiny_task_dir, tmp_path):
    rows = [json.loads(line) for line in (tiny_task_dir / "data" / "pairs_train.jsonl").read_text().splitlines()]
    rows = rows[:24]
    for r in rows[:5]:
        r["prompt"] = "Tell me about the cat and the dog. " * 20 + "\n"
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tiny_cfg(tiny_task_dir, tmp_path / "out", dataset_name=str(tmp_path / "pairs.jsonl"), max_length=64,
                   length_mode="drop")
    trainer, _, (report, _) = build_trainer(cfg)
    assert report.dropped == {"prompt alone has >= max_length=64 tokens": 5}
    assert len(trainer.train_dataset) == 19
    with pytest.raises(DataError, match="No training pairs left"):
        build_trainer(tiny_cfg(tiny_task_dir, tmp_path / "out", dataset_name=str(tmp_path / "pairs.jsonl"),
                               max_length=4, length_mode="drop"))
    # the default keeps them, their prompts cut from the left; only pairs with no room at all go
    trainer, _, (report, _) = build_trainer(tiny_cfg(tiny_task_dir, tmp_path / "out",
                                                     dataset_name=str(tmp_path / "pairs.jsonl"), max_length=64))
    assert report.truncated == {"prompt cut from the left to fit max_length=64": 5} and not report.dropped
    assert len(trainer.train_dataset) == 24
    with pytest.raises(DataError, match="No training pairs left"):
        build_trainer(tiny_cfg(tiny_task_dir, tmp_path / "out", dataset_name=str(tmp_path / "pairs.jsonl"),
                               max_length=2))


def test_empty_eval_split_is_a_data_error(tiny_task_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows"):
        build_trainer(tiny_cfg(tiny_task_dir, tmp_path / "out", eval_dataset_name=str(tmp_path / "empty.jsonl")))


# -------------------------------------------------------------------------------------------- LoRA training
def test_lora_dpo_changes_only_the_adapter_and_the_reference_is_the_base(tiny_task_dir, tmp_path):
    from rlhf_lm.evaluation import reference_mode

    trainer, tok, _ = build_trainer(tiny_cfg(tiny_task_dir, tmp_path / "out", max_steps=6))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert not trainer.args.gradient_checkpointing
    trainer.train()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in trainer.model.named_parameters():
        if n in trainable and "lora_B" in n:  # B starts at zero; every B must have moved
            assert not torch.equal(p, before[n]), f"{n} did not change"
        elif n not in trainable:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    # The reference (adapters off) is exactly the untouched base model.
    base = load_causal_lm(str(tiny_task_dir / "base_policy"), dtype="float32")
    ids = torch.tensor([tok("Describe the cat and the dog.\nthe cat is happy .")["input_ids"]])
    with torch.no_grad(), reference_mode(trainer.model) as ref:
        torch.testing.assert_close(torch.log_softmax(ref(ids).logits, -1), torch.log_softmax(base(ids).logits, -1))
    with torch.no_grad():
        assert not torch.allclose(trainer.model(ids).logits, base(ids).logits)
    assert trainer.state.log_history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == ref at step 0


def test_run_writes_the_adapter_metrics_and_samples(tiny_task_dir, tmp_path):
    out = tmp_path / "dpo"
    metrics = run(tiny_cfg(tiny_task_dir, out, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1]))
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "ref").exists() and not list(out.glob("checkpoint-*"))
    assert not Path(str(out) + ".partial").exists()
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("eval/implicit_accuracy", "eval/implicit_margin", "eval/kl", "eval/gold_win_rate",
                "eval/gold_reward/policy", "eval/gold_reward/reference", "eval/num_prompts"):
        assert key in metrics and saved["metrics"][key] == pytest.approx(metrics[key])
    assert saved["data"]["train"]["rows_out"] == 96 and saved["data"]["eval"]["rows_out"] == 32
    assert saved["config"]["loss_type"] == ["sigmoid", "sft"] and saved["run"]["reference"] == "base (adapters off)"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"prompt", "policy", "reference", "scores"} <= set(samples[0])


class CrashAfterSave(TrainerCallback):
    """Stands in for a killed job: raise right after the checkpoint at ``step`` is written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed after step {self.step}")


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_task_dir, tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, eval_prompts=None, eval_num_prompts=1,
                  eval_gold=False)
    run(tiny_cfg(tiny_task_dir, tmp_path / "straight", **common))
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(tiny_task_dir, tmp_path / "resumed", **common), callbacks=[CrashAfterSave(3)])
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "checkpoint-3").is_dir()
    metrics = run(tiny_cfg(tiny_task_dir, tmp_path / "resumed", resume_from_checkpoint=True, **common))
    assert metrics["train/steps"] == 6
    straight, resumed = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- SFT adapter start
def test_dpo_from_an_sft_adapter_keeps_the_sft_policy_as_reference(tiny_task_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from rlhf_lm.evaluation import reference_mode

    base_dir = str(tiny_task_dir / "base_policy")
    torch.manual_seed(1)  # a stand-in SFT adapter: random (non-zero) LoRA weights, so SFT policy != base
    sft = get_peft_model(load_causal_lm(base_dir, dtype="float32"),
                         LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    sft.save_pretrained(tmp_path / "sft")
    sft_policy = PeftModel.from_pretrained(load_causal_lm(base_dir, dtype="float32"), tmp_path / "sft")

    trainer, tok, _ = build_trainer(tiny_cfg(tiny_task_dir, tmp_path / "out", sft_adapter_path=str(tmp_path / "sft")))
    ids = torch.tensor([tok("Describe the cat and the dog.\nthe cat is happy .")["input_ids"]])
    with torch.no_grad():
        sft_logits = sft_policy(ids).logits
        torch.testing.assert_close(trainer.model(ids).logits, sft_logits)  # training starts from the SFT policy
    ref_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".ref." in n}
    trainer.train()
    with torch.no_grad(), reference_mode(trainer.model) as ref:
        torch.testing.assert_close(ref(ids).logits, sft_logits)  # the reference is still the SFT policy
    for n, p in trainer.model.named_parameters():
        if ".ref." in n:
            assert torch.equal(p, ref_before[n]) and not p.requires_grad
    assert trainer.state.log_history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_missing_sft_adapter_is_an_artifact_error(tiny_task_dir, tmp_path):
    with pytest.raises(ArtifactError, match="adapter_config.json"):
        build_trainer(tiny_cfg(tiny_task_dir, tmp_path / "out", sft_adapter_path=str(tmp_path)))


# ------------------------------------------------------------------------------------------ full fine-tune
def test_full_finetune_uses_an_explicit_frozen_reference(tiny_task_dir, tmp_path):
    trainer, _, _ = build_trainer(tiny_cfg(tiny_task_dir, tmp_path / "out", use_peft=False, max_steps=2,
                                           learning_rate=1e-4))
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    policy_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert all(torch.equal(p, ref_before[n]) for n, p in trainer.ref_model.named_parameters())
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, policy_before[n])]
    assert len(changed) == len(policy_before)


def test_precomputed_reference_log_probs_give_the_same_first_loss(tiny_task_dir, tmp_path):
    losses = []
    for precompute in (False, True):
        trainer, _, _ = build_trainer(tiny_cfg(tiny_task_dir, tmp_path / f"out{precompute}", max_steps=1,
                                               precompute_ref_log_probs=precompute))
        assert ("ref_chosen_logps" in trainer.train_dataset.column_names) == precompute
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_reference_log_probs_are_precomputed_by_default_only_for_more_than_one_pass(tiny_task_dir, tmp_path):
    """Default precompute_ref_log_probs: on when training visits the data more than once (epochs, or max_steps
    beyond one epoch), off for one pass, and an explicit value always wins."""
    cases = [({"max_steps": -1, "num_train_epochs": 2}, True), ({"max_steps": -1, "num_train_epochs": 1}, False),
             ({"max_steps": 1}, False), ({"max_steps": 1, "precompute_ref_log_probs": True}, True),
             ({"max_steps": -1, "num_train_epochs": 2, "precompute_ref_log_probs": False}, False)]
    for i, (overrides, expected) in enumerate(cases):
        cfg = tiny_cfg(tiny_task_dir, tmp_path / f"out{i}", **overrides)
        trainer, _, _ = build_trainer(cfg)
        assert cfg.precompute_ref_log_probs is expected, overrides
        assert ("ref_chosen_logps" in trainer.train_dataset.column_names) == expected, overrides
    pairs = len(trainer.train_dataset)  # 8 pairs per step: ceil(pairs / 8) steps make one pass
    steps_per_pass = -(-pairs // 8)
    assert passes_over_data(tiny_cfg(tiny_task_dir, tmp_path, max_steps=steps_per_pass), pairs) == 1.0
    assert passes_over_data(tiny_cfg(tiny_task_dir, tmp_path, max_steps=steps_per_pass + 1), pairs) > 1.0


def test_dpo_learns_the_preferences_it_is_trained_on(tiny_task_dir, tmp_path):
    """Before training every implicit reward is 0; after, the chosen responses of the training pairs win."""
    from rlhf_lm.evaluation import implicit_reward_metrics

    trainer, _, _ = build_trainer(tiny_cfg(tiny_task_dir, tmp_path / "out", max_steps=24, per_device_train_batch_size=16,
                                           beta=0.5, logging_steps=100))
    before = implicit_reward_metrics(trainer.evaluate(trainer.train_dataset))
    trainer.train()
    after = implicit_reward_metrics(trainer.evaluate(trainer.train_dataset))
    assert before["eval/implicit_margin"] == pytest.approx(0.0, abs=1e-6)
    assert after["eval/implicit_accuracy"] >= 0.65 and after["eval/implicit_margin"] > 0.1
    assert after["eval/dpo_loss"] < before["eval/dpo_loss"] - 0.05


def test_token_cache_is_keyed_by_data_and_tokenizer(tiny_task_dir, tmp_path):
    tok = load_tokenizer(str(tiny_task_dir / "base_policy"))
    rows = [json.loads(line) for line in (tiny_task_dir / "data" / "pairs_train.jsonl").read_text().splitlines()]
    first = tokenize_pairs(Dataset.from_list(rows[:30]), tok, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("dpo-pairs-*.arrow"))) == 1
    again = tokenize_pairs(Dataset.from_list(rows[:30]), tok, cache_dir=tmp_path)  # same content: read back
    assert len(list(tmp_path.glob("dpo-pairs-*.arrow"))) == 1 and again["chosen_ids"] == first["chosen_ids"]
    tokenize_pairs(Dataset.from_list(rows[1:31]), tok, cache_dir=tmp_path)  # other data: a new entry
    tok.chat_template = tok.chat_template + " "  # another tokenizer setup: a new entry too
    tokenize_pairs(Dataset.from_list(rows[:30]), tok, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("dpo-pairs-*.arrow"))) == 3


def test_a_rerun_on_warm_caches_trains_exactly_like_a_cold_run(tiny_task_dir, tmp_path, monkeypatch):
    """Token cache and TRL's cache of precomputed reference log-probs: cold on the first run, read back on the
    second. Skipping the precompute pass must not change the batches (its dataloader draws from the global RNG)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    trained = []
    for run_index in range(2):
        cfg = tiny_cfg(tiny_task_dir, tmp_path / f"out{run_index}", max_steps=-1, num_train_epochs=2,
                       logging_steps=100)
        trainer, _, _ = build_trainer(cfg)
        assert cfg.precompute_ref_log_probs
        trainer.train()
        trained.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert list((tmp_path / "hf_cache" / "rlhf_lm").glob("cache-*.arrow"))  # TRL's reference cache was there
    for name in trained[0]:
        assert torch.equal(trained[0][name], trained[1][name]), name


def test_real_multi_turn_dialogues_tokenize_like_trl_and_long_ones_are_counted(hh_pairs_path, tiny_task_dir):
    """HH-RLHF dialogues: the same token ids as TRL, and every pair over max_length counted, by mode."""
    from rlhf_lm.data import load_rows, normalize_preferences

    tok = load_tokenizer(str(tiny_task_dir / "base_policy"))
    rows = load_rows(hh_pairs_path)
    rows.dataset = rows.dataset.select(range(200))
    pairs, _ = normalize_preferences(rows, "hh_rlhf")
    ours = tokenize_pairs(pairs, tok)
    theirs = _trl_tokenized(pairs, tok)
    assert ours["chosen_ids"] == theirs["chosen_ids"] and ours["prompt_ids"] == theirs["prompt_ids"]
    for mode in ("drop", "truncate"):
        report = DataReport(source="hh", rows_in=len(ours))
        kept = apply_length_limit(ours, 256, mode, report)
        counted = sum(report.dropped.values()) + (sum(report.truncated.values()) if mode == "truncate" else 0)
        prompt_drops = report.dropped.get("prompt alone has >= max_length=256 tokens", 0)
        assert counted > 0 and report.rows_out == len(kept) == len(ours) - sum(report.dropped.values())
        assert len(kept) == len(ours) - prompt_drops - (0 if mode == "truncate" else
                                                        report.dropped["pair over max_length=256"])


def test_on_data_outside_the_task_the_generation_eval_uses_the_held_out_pairs_prompts(tiny_task_dir, tmp_path):
    """Not a task dir, no eval_prompts: the prompts of the held-out pairs that no training pair has (before, the
    generation eval was silently skipped on real data)."""
    from rlhf_lm.dpo.evaluation import load_eval_prompts
    from rlhf_lm.preference_pairs import load_pairs
    from rlhf_lm.stages.dpo import run

    rows = [json.loads(line) for line in (tiny_task_dir / "data" / "pairs_train.jsonl").read_text().splitlines()]
    data = tmp_path / "data" / "pairs.jsonl"  # the same rows, out of the task dir
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:60]))
    cfg = tiny_cfg(tiny_task_dir, tmp_path / "out", dataset_name=str(data), eval_dataset_name=None,
                   eval_fraction=0.25, max_steps=1)
    train, held_out, _, _ = load_pairs(cfg)
    prompts = load_eval_prompts(cfg)
    assert prompts and set(prompts) <= set(held_out["prompt"]) and not set(prompts) & set(train["prompt"])
    metrics = run(cfg)
    assert metrics["eval/num_prompts"] == min(len(prompts), cfg.eval_num_prompts) and "eval/kl" in metrics


def test_long_prompts_are_cut_from_the_left_and_only_impossible_pairs_dropped():
    from rlhf_lm.preference_pairs import apply_length_limit

    rows = [{"prompt_ids": list(range(1, 9)), "chosen_ids": [20, 21], "rejected_ids": [30, 31, 32]},  # 8 + 3 > 6
            {"prompt_ids": [1, 2], "chosen_ids": [20], "rejected_ids": [30]},  # fits
            {"prompt_ids": [1, 2], "chosen_ids": list(range(20, 26)), "rejected_ids": [30]}]  # response alone = 6
    report = DataReport(source="pairs", rows_in=3)
    kept = apply_length_limit(Dataset.from_list(rows), 6, "truncate_prompt", report)
    assert kept["prompt_ids"] == [[6, 7, 8], [1, 2]]  # the last turns stay: room 6 - 3 = 3 tokens
    assert kept["chosen_ids"] == [[20, 21], [20]] and report.rows_out == 2
    assert report.truncated == {"prompt cut from the left to fit max_length=6": 1}
    assert report.dropped == {"response alone has >= max_length=6 tokens": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_qlora_on_a_cpu_fails_before_any_data_is_read(tiny_task_dir, tmp_path):
    cfg = tiny_cfg(tiny_task_dir, tmp_path / "out", load_in_4bit=True, dataset_name=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="load_in_4bit .*needs a CUDA GPU"):
        build_trainer(cfg)  # not the DataError of the missing file: nothing was read


def test_a_bf16_full_fine_tune_without_sharding_warns_that_updates_round_away(tiny_task_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="rlhf_lm.stages.dpo"):
        tiny_cfg(tiny_task_dir, tmp_path / "out", use_peft=False, dtype="bfloat16")
    assert "no float32 master weights" in caplog.text
