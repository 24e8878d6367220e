"""Evaluation: generation, KL, win-rate and the policy-vs-reference report, on the tiny task's base policy."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_lm.errors import ConfigError, DataError
from rlhf_lm.evaluation import (
    completion_logprobs,
    evaluate_policy,
    generate_completions,
    implicit_reward_metrics,
    kl_per_token,
    length_controlled_win_rate,
    reference_mode,
    sequence_kl,
    win_rate,
)
from rlhf_lm.modeling import load_causal_lm, load_tokenizer
from rlhf_lm.rewards import FunctionReward, GoldReward


@pytest.fixture(scope="module")
def base(tiny_task_dir):
    path = str(tiny_task_dir / "base_policy")
    return load_causal_lm(path, dtype="float32"), load_tokenizer(path)


@pytest.fixture(scope="module")
def prompts(tiny_task_dir):
    rows = (tiny_task_dir / "data" / "prompts_eval.jsonl").read_text().splitlines()
    return [json.loads(r)["prompt"] for r in rows][:12]


def _lora(model, random_init: bool):
    """A LoRA copy of ``model``; random_init=False gives the standard zero-init B (policy == reference)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           init_lora_weights=not random_init))


# ----------------------------------------------------------------------------------------------- pure functions
def test_win_rate_counts_ties_as_half():
    policy = torch.tensor([1.0, 0.0, 0.5, -1.0])
    reference = torch.tensor([0.0, 0.0, 1.0, -2.0])
    assert win_rate(policy, reference) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def _outcomes(groups: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """(prompts, of them won, policy length minus reference length) per group -> scores and lengths."""
    policy, lengths = [], []
    for prompts, won, length_diff in groups:
        policy += [1.0] * won + [0.0] * (prompts - won)
        lengths += [20 + length_diff] * prompts
    n = len(policy)
    return [torch.tensor(policy), torch.full((n,), 0.5), torch.tensor(lengths), torch.full((n,), 20)]


def test_length_controlled_win_rate_removes_what_length_explains():
    # Shorter answers win 80% of the time, longer ones 20%, whoever wrote them; the policy is shorter on 30 of 40
    # prompts, so it wins 0.65 by length alone; at equal lengths it would win half (the fit's slope prior moves it
    # by 0.005).
    scores_and_lengths = _outcomes([(30, 24, -10), (10, 2, +10)])
    assert win_rate(*scores_and_lengths[:2]) == pytest.approx(0.65)
    assert length_controlled_win_rate(*scores_and_lengths) == pytest.approx(0.5, abs=0.01)
    assert length_controlled_win_rate(*scores_and_lengths, slope_prior=0.0) == pytest.approx(0.5, abs=1e-6)


def test_length_controlled_win_rate_keeps_what_length_does_not_explain():
    # 80% wins whether the policy's answer is shorter or longer: length explains nothing.
    assert length_controlled_win_rate(*_outcomes([(30, 24, -10), (10, 8, +10)])) == pytest.approx(0.8, abs=1e-6)
    # Equal lengths everywhere: the plain win-rate, ties counting half.
    policy, reference = torch.tensor([1.0, 1.0, 0.5, 0.0]), torch.tensor([0.0, 0.0, 0.5, 1.0])
    same = torch.full((4,), 12)
    assert length_controlled_win_rate(policy, reference, same, same) == pytest.approx(0.5 * (1 + 1 + 0.5 + 0) / 2)


def test_length_controlled_win_rate_stays_finite_when_length_decides_every_prompt():
    # Won exactly where shorter: by symmetry 0.5 (an unpenalised slope would run off to infinity).
    assert length_controlled_win_rate(*_outcomes([(20, 20, -10), (20, 0, +10)])) == pytest.approx(0.5, abs=1e-6)
    assert length_controlled_win_rate(*_outcomes([(40, 40, -5)])) > 0.999  # every prompt won
    assert length_controlled_win_rate(*_outcomes([(40, 0, 4)])) < 0.001
    assert math.isnan(length_controlled_win_rate(*[torch.tensor([])] * 4))  # no prompts: no win-rate


def test_kl_per_token_is_the_mean_log_ratio_per_sample():
    policy = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5]), torch.tensor([])]
    reference = [torch.tensor([-1.5, -1.0]), torch.tensor([-1.0]), torch.tensor([])]
    torch.testing.assert_close(kl_per_token(policy, reference), torch.tensor([(0.5 - 1.0) / 2, 0.5, 0.0]))


def test_implicit_reward_metrics_renames_trl_keys():
    out = implicit_reward_metrics({"eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.2, "epoch": 1.0})
    assert out == {"eval/implicit_accuracy": 0.75, "eval/implicit_margin": 0.2}


# ------------------------------------------------------------------------------------------------ generation
def test_batched_left_padded_generation_matches_one_by_one(base, prompts):
    model, tok = base
    prompts = prompts + ["Tell me about the cat and the dog, and also the horse and the bird.\n"]  # uneven lengths
    batched = generate_completions(model, tok, prompts, temperature=0, max_new_tokens=12, batch_size=16)
    single = [generate_completions(model, tok, [p], temperature=0, max_new_tokens=12)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(c, str) for c in batched) and any(c.strip() for c in batched)


def test_sampling_is_seeded_and_leaves_global_rng_alone(base, prompts):
    model, tok = base
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generate_completions(model, tok, prompts, seed=7, max_new_tokens=16)
    after = torch.rand(1)
    b = generate_completions(model, tok, prompts, seed=7, max_new_tokens=16)
    c = generate_completions(model, tok, prompts, seed=8, max_new_tokens=16)
    assert a == b and a != c
    assert torch.equal(before, after)


def test_generation_stops_at_eos(base, prompts):
    model, tok = base
    from rlhf_lm.evaluation import generate_token_ids
    from rlhf_lm.sampling import encode_prompts

    ids = generate_token_ids(model, tok, encode_prompts(tok, prompts), max_new_tokens=64, seed=0)
    for row in ids:
        assert tok.eos_token_id not in row[:-1]  # nothing after the first EOS
    assert any(row and row[-1] == tok.eos_token_id for row in ids)  # the pre-trained policy does emit EOS


def test_conversational_prompts_use_the_chat_template(base):
    model, tok = base
    chat = [[{"role": "user", "content": "Describe the cat and the dog."}]]
    text = tok.apply_chat_template(chat[0], tokenize=False, add_generation_prompt=True)
    assert text.endswith("assistant:")
    assert generate_completions(model, tok, chat, temperature=0, max_new_tokens=8) == \
        generate_completions(model, tok, [text], temperature=0, max_new_tokens=8)


# ---------------------------------------------------------------------------------------------------------- KL
def test_completion_logprobs_match_an_unpadded_forward(base):
    model, tok = base
    prompt_ids = [tok("Describe the cat and the dog.\n")["input_ids"], tok("Hi\n")["input_ids"]]
    completion_ids = [tok("the cat is happy .")["input_ids"] + [tok.eos_token_id], tok("a sad rain .")["input_ids"]]
    batched = completion_logprobs(model, prompt_ids, completion_ids, tok.pad_token_id)
    for p, c, got in zip(prompt_ids, completion_ids, batched, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0].float()
        expected = torch.log_softmax(logits[len(p) - 1:-1], -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sequence_kl_is_zero_against_itself_and_positive_after_a_change(base, prompts):
    model, tok = base
    completions = generate_completions(model, tok, prompts, seed=1, max_new_tokens=16)
    assert torch.allclose(sequence_kl(model, model, tok, prompts, completions), torch.zeros(len(prompts)))
    zero_init = _lora(model, random_init=False)
    assert torch.allclose(sequence_kl(zero_init, None, tok, prompts, completions), torch.zeros(len(prompts)),
                          atol=1e-6)
    changed = _lora(model, random_init=True)
    policy_samples = generate_completions(changed, tok, prompts, seed=1, max_new_tokens=16)
    assert sequence_kl(changed, None, tok, prompts, policy_samples).mean() > 0


def test_reference_mode_gives_the_base_model_and_restores_the_adapter(base):
    model, tok = base
    policy = _lora(model, random_init=True)
    ids = torch.tensor([tok("Describe the cat and the dog.\n")["input_ids"]])
    with torch.no_grad():
        adapted = policy(ids).logits
        with reference_mode(policy) as ref:
            torch.testing.assert_close(ref(ids).logits, model(ids).logits)
        torch.testing.assert_close(policy(ids).logits, adapted)
    with pytest.raises(ConfigError, match="LoRA"):
        with reference_mode(model):
            pass


def test_reference_mode_prefers_a_ref_adapter(base):
    """A policy trained on from an earlier adapter keeps a frozen copy named "ref": that is its reference."""
    model, tok = base
    policy = _lora(model, random_init=True)
    policy.add_adapter("ref", policy.peft_config["default"])
    for name, param in policy.named_parameters():
        if ".ref." in name:
            param.data.copy_(policy.get_parameter(name.replace(".ref.", ".default.")).data)
    ids = torch.tensor([tok("Describe the cat and the dog.\n")["input_ids"]])
    with torch.no_grad():
        adapted = policy(ids).logits
        with reference_mode(policy) as ref:
            torch.testing.assert_close(ref(ids).logits, adapted)  # the copy, not the bare base
    assert policy.active_adapter == "default"


# --------------------------------------------------------------------------------------------- evaluate_policy
def test_evaluate_policy_against_an_identical_reference_ties(base, prompts, tmp_path):
    model, tok = base
    policy = _lora(model, random_init=False)  # zero-init LoRA: policy == reference, same seed -> same samples
    samples = tmp_path / "samples.jsonl"
    m = evaluate_policy(policy, tok, prompts, FunctionReward(lambda p, c: float(len(c))), gold=True,
                        samples_path=samples, max_new_tokens=16)
    assert m["eval/num_prompts"] == len(prompts)
    assert m["eval/win_rate"] == 0.5 and m["eval/gold_win_rate"] == 0.5
    assert m["eval/lc_win_rate"] == pytest.approx(0.5) and m["eval/gold_lc_win_rate"] == pytest.approx(0.5)
    assert m["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["eval/reward/policy"] == m["eval/reward/reference"]
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == len(prompts)
    assert rows[0]["policy"] == rows[0]["reference"] and set(rows[0]["scores"]) >= {"kl", "reward_policy",
                                                                                   "gold_policy"}


def test_gold_is_one_more_judge_and_reads_a_chat_prompt_by_its_last_message(base, prompts, tmp_path):
    """Gold is scored by GoldReward, as PPO / GRPO train on it: a chat prompt by its last message (the task's
    prompt), not by the chat template's text, whose earlier turns name other nouns (here a food in the system turn)."""
    model, tok = base
    chats = [[{"role": "system", "content": "Think of bread."}, {"role": "user", "content": p}] for p in prompts[:4]]
    samples = tmp_path / "samples.jsonl"
    m = evaluate_policy(_lora(model, random_init=True), tok, chats, gold=True, samples_path=samples,
                        max_new_tokens=16)
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    for side in ("policy", "reference"):
        expected = GoldReward()(chats, [row[side] for row in rows])
        assert [row["scores"][f"gold_{side}"] for row in rows] == pytest.approx(expected.tolist(), abs=1e-6)
        assert m[f"eval/gold_reward/{side}"] == pytest.approx(expected.mean().item(), abs=1e-6)


def test_evaluate_policy_scores_a_different_policy(base, prompts):
    model, tok = base
    policy = _lora(model, random_init=True)
    m = evaluate_policy(policy, tok, prompts, FunctionReward(lambda p, c: -float(len(c))), max_new_tokens=16)
    assert m["eval/kl"] > 0
    assert 0.0 <= m["eval/win_rate"] <= 1.0
    assert "eval/gold_win_rate" not in m
    policy_texts = generate_completions(policy, tok, prompts, max_new_tokens=16)
    assert m["eval/reward/policy"] == pytest.approx(-sum(map(len, policy_texts)) / len(prompts))


def test_evaluate_policy_rejects_empty_prompts(base):
    model, tok = base
    with pytest.raises(DataError, match="empty"):
        evaluate_policy(model, tok, [], reference=model)
