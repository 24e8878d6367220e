"""The built-in gold-reward task: deterministic, held-out, and labelled at the noise rate it claims."""

import json

import pytest
import torch

from rlhf_lm.builtin_task.task import (
    ADJ_SCORE,
    NOUN_TOPIC,
    TaskConfig,
    generate_task,
    gold_reward,
    label_agreement,
    sample_completion,
    split_prompts,
)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("the cat is happy . the dog was very kind .", 1.0),  # positive, on topic, both asked nouns
        ("the cat is sad .", (-1 + 1 + 0) / 3),  # negative, on topic, one of two nouns
        ("a lovely rain .", (1 - 1 - 1) / 3),  # positive, off topic, no asked noun
        ("the horse is great . the rain is awful .", (0 + 0 + -1) / 3),
        ("hello world", -1.0),  # nothing scorable
    ],
)
def test_gold_reward_by_hand(completion, expected):
    assert gold_reward("Describe the cat and the dog.\n", completion) == pytest.approx(expected)


def test_task_is_deterministic_by_seed():
    a, b, c = generate_task(TaskConfig(seed=0)), generate_task(TaskConfig(seed=0)), generate_task(TaskConfig(seed=1))
    assert a.train_pairs == b.train_pairs and a.pretrain_texts == b.pretrain_texts
    assert a.train_pairs != c.train_pairs


def test_eval_prompts_are_held_out_of_all_training_data():
    data = generate_task(TaskConfig(seed=0))
    held_out = set(data.eval_prompts)
    assert held_out and not held_out & set(data.train_prompts)
    assert not held_out & {p["prompt"] for p in data.train_pairs}
    assert not any(text.startswith(tuple(held_out)) for text in data.pretrain_texts)
    assert {p["prompt"] for p in data.eval_pairs} <= held_out


def test_labels_agree_with_gold_at_the_rate_the_noise_implies():
    cfg = TaskConfig(seed=0, num_train_pairs=4000)
    observed, expected = label_agreement(generate_task(cfg).train_pairs, cfg.label_temperature)
    # 4000 Bernoulli draws: the standard error is ~0.006
    assert observed == pytest.approx(expected, abs=0.025)
    assert 0.75 < observed < 0.95  # noisy like human annotators, but learnable
    noisier = TaskConfig(seed=0, num_train_pairs=4000, label_temperature=1.0)
    assert label_agreement(generate_task(noisier).train_pairs, 1.0)[0] < observed - 0.05


def test_generator_spans_the_reward_range():
    import random

    rng = random.Random(0)
    prompt = split_prompts()[0][0]
    rewards = [gold_reward(prompt, sample_completion(prompt, rng)) for _ in range(500)]
    assert min(rewards) < -0.6 and max(rewards) > 0.6


def test_built_task_layout_and_base_policy(tiny_task_dir):
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer

    meta = json.loads((tiny_task_dir / "task.json").read_text())
    assert meta["config"]["seed"] == 1
    for name in ("pairs_train", "pairs_eval", "prompts_train", "prompts_eval"):
        assert (tiny_task_dir / "data" / f"{name}.jsonl").is_file()
    tok = load_tokenizer(str(tiny_task_dir / "base_policy"), padding_side="left")
    model = load_causal_lm(str(tiny_task_dir / "base_policy"))
    batch = tok(["Describe the cat and the dog.\n"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > batch["input_ids"].shape[1]


def test_pretraining_teaches_the_format(task_dir):
    """The default base policy writes task-like sentences and ends them with EOS."""
    from rlhf_lm.modeling import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(task_dir / "base_policy"), padding_side="left")
    model = load_causal_lm(str(task_dir / "base_policy"))
    prompts = split_prompts()[1][:32]
    batch = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=48, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    assert (new == tok.eos_token_id).any(dim=1).float().mean() > 0.9
    texts = tok.batch_decode(new, skip_special_tokens=True)
    task_words = set(NOUN_TOPIC) | set(ADJ_SCORE)
    well_formed = sum(any(w in task_words for w in t.split()) and t.strip().endswith(".") for t in texts)
    assert well_formed >= 28
