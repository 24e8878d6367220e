"""Sampling as PPO and evaluation share it (rlhf_lm.sampling): the plain softmax whatever a checkpoint's
generation_config says, one set of stop tokens, one prompt tokenization, and a seeded RNG that is given back."""

from __future__ import annotations

import pytest
import torch

from rlhf_lm.modeling import load_causal_lm, load_tokenizer
from rlhf_lm.ppo.rollout import truncate_after_eos
from rlhf_lm.sampling import (
    encode_prompts,
    length_batches,
    sample,
    sampling_config,
    seeded,
    stop_token_ids,
)

# What a chat checkpoint's generation_config.json holds (Qwen2.5-Instruct ships top_k 20, top_p 0.8, repetition
# penalty 1.05; the others are other checkpoints' favourites). None of it may reach PPO's sampler.
CHECKPOINT_SAMPLING = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3, min_p=0.05,
                           no_repeat_ngram_size=2)


def _policy(task_dir, **generation_config):
    tokenizer = load_tokenizer(str(task_dir / "base_policy"), padding_side="left")
    model = load_causal_lm(str(task_dir / "base_policy"), dtype="float32").eval()
    model.generation_config.update(**generation_config)
    return model, tokenizer


def _scores_and_logits(generate, model, tokenizer, config):
    """What generate sampled from at each step (processed scores) next to the raw logits."""
    ids = torch.tensor([encode_prompts(tokenizer, ["the quick brown fox"])[0]] * 4)
    config.update(max_new_tokens=6, return_dict_in_generate=True, output_scores=True, output_logits=True)
    torch.manual_seed(0)
    out = generate(model, ids, torch.ones_like(ids), config)
    return torch.stack(out.scores), torch.stack(out.logits)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_samples_come_from_the_plain_softmax_whatever_the_checkpoint_says(tiny_task_dir, temperature):
    """generate's processed scores (what it samples from) must be the raw logits / temperature: no top-k / top-p /
    min-p cut, no repetition or n-gram penalty, though the checkpoint's generation_config asks for all of them."""
    model, tokenizer = _policy(tiny_task_dir, **CHECKPOINT_SAMPLING)
    ours = sampling_config(max_new_tokens=6, stop_ids=[], pad_id=tokenizer.pad_token_id, temperature=temperature)
    scores, logits = _scores_and_logits(sample, model, tokenizer, ours)
    assert torch.isfinite(scores).all()  # nothing cut to -inf
    torch.testing.assert_close(scores, logits / temperature)
    assert model.generation_config.top_k == 20  # the checkpoint's own config is given back untouched

    # The leak this guards against: generate() fills every option a config leaves unset from the checkpoint's
    # generation_config (our rollouts passed top_k=None for "no cut" and set no penalty at all).
    from transformers import GenerationConfig

    def plain_generate(model, ids, mask, config):
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    unset = GenerationConfig(do_sample=True, temperature=temperature, top_k=None, pad_token_id=tokenizer.pad_token_id)
    leaked_scores, leaked_logits = _scores_and_logits(plain_generate, model, tokenizer, unset)
    assert (~torch.isfinite(leaked_scores)).any()  # top-k / top-p / min-p cut tokens out


def test_ppo_rollouts_and_evaluation_sample_beyond_a_checkpoint_top_k_of_one(tiny_task_dir):
    """A checkpoint with top_k=1 in its generation_config: leaking, every sample would be the greedy one."""
    from peft import LoraConfig, get_peft_model

    from rlhf_lm.evaluation import generate_completions
    from rlhf_lm.ppo import PPOConfig
    from rlhf_lm.ppo.model import PolicyWithValueHead
    from rlhf_lm.ppo.rollout import collect_rollout

    model, tokenizer = _policy(tiny_task_dir, do_sample=True, top_k=1)
    prompts = ["the quick brown fox"] * 16
    texts = generate_completions(model, tokenizer, prompts, max_new_tokens=8, seed=0)
    assert len(set(texts)) > 4, texts

    policy = PolicyWithValueHead(get_peft_model(model, LoraConfig(r=2, target_modules="all-linear")))
    args = PPOConfig(output_dir="unused", max_new_tokens=8, use_cpu=True, report_to="none")
    rollout = collect_rollout(policy, tokenizer, prompts, encode_prompts(tokenizer, prompts),
                              lambda p, c: torch.zeros(len(c)), args, forward_batch_size=16)
    assert len(set(rollout.completions)) > 4, rollout.completions


def test_one_set_of_stop_tokens(tiny_task_dir):
    """Stop at the tokenizer's EOS and at every EOS id of the checkpoint (Llama-3 / Qwen instruct list several)."""
    model, tokenizer = _policy(tiny_task_dir)
    eos, other = tokenizer.eos_token_id, 7
    model.generation_config.eos_token_id = [other, eos]
    assert stop_token_ids(model, tokenizer) == sorted({eos, other})
    responses = torch.tensor([[5, other, 9, 9], [5, 6, eos, 9], [5, 6, 6, 6]])
    cut, mask, has_eos = truncate_after_eos(responses, stop_token_ids(model, tokenizer), pad_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert cut.tolist() == [[5, other, 0, 0], [5, 6, eos, 0], [5, 6, 6, 6]]
    assert has_eos.tolist() == [True, True, False]


def _tokenizer_with_bos():
    """A tokenizer that puts BOS before plain text (as Llama's do), with a chat template that writes its own."""
    from tokenizers import processors

    from rlhf_lm.modeling import train_tokenizer

    tok = train_tokenizer(["the cat sat on the mat . " * 20], vocab_size=300)
    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                                         special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = "<s>{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return tok


def test_ppo_dpo_and_evaluation_tokenize_prompts_alike():
    """BOS once: added to plain text as TRL's DPO adds it, never added again over a chat template's own."""
    from datasets import Dataset

    from rlhf_lm.ppo.trainer import tokenize_prompts
    from rlhf_lm.preference_pairs import tokenize_pairs

    tok = _tokenizer_with_bos()
    plain, chat = "the cat sat", [{"role": "user", "content": "the cat"}]
    ours = encode_prompts(tok, [plain, chat])
    assert [ids[0] for ids in ours] == [tok.bos_token_id] * 2
    assert [ids.count(tok.bos_token_id) for ids in ours] == [1, 1]
    _, ppo_ids, _ = tokenize_prompts([plain, chat], tok, max_prompt_length=100)
    assert ppo_ids == ours
    pairs = Dataset.from_list([{"prompt": plain, "chosen": " on", "rejected": " off"}])
    assert tokenize_pairs(pairs, tok)["prompt_ids"][0] == ours[0]


def test_seeded_sampling_gives_the_callers_random_state_back():
    before = torch.get_rng_state()
    with seeded(3, torch.device("cpu")):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with seeded(3, torch.device("cpu")):
        assert torch.equal(torch.rand(3), first)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_seeded_sampling_gives_the_cuda_random_state_back_too():
    device = torch.device("cuda")
    torch.cuda.manual_seed(11)
    before = torch.cuda.get_rng_state(device)
    with seeded(3, device):
        torch.rand(3, device=device)
    assert torch.equal(torch.cuda.get_rng_state(device), before)


def test_length_batches_cover_every_row_once_and_bound_padding():
    lengths = [36, 572, 47, 120, 525, 77, 300, 40, 514, 146, 38, 210]
    batches = length_batches(lengths, max_rows=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        padded, real = len(b) * max(lengths[i] for i in b), sum(lengths[i] for i in b)
        assert padded <= 1.25 * real or len(b) == 1
    # one batch of 64-wide padding would be 12 x 572 = 6864 positions for 2625 real tokens
    assert sum(len(b) * max(lengths[i] for i in b) for b in batches) < 1.25 * sum(lengths)
    assert all(len(b) <= 2 for b in length_batches(lengths, max_rows=2))
    assert length_batches([5] * 10, max_rows=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # alike lengths: full batches
    assert length_batches([], max_rows=4) == []
