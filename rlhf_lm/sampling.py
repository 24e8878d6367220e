"""Sampling shared by PPO rollouts and evaluation: the same prompt tokens, the same stop tokens, the plain softmax.

Three things a real checkpoint changes, and that must agree wherever the policy samples or is scored:

* **Prompt tokens.** Plain-text prompts get the tokenizer's special tokens (BOS where the tokenizer adds one), as
  TRL's DPOTrainer tokenizes them; chat prompts go through the chat template, which writes its own specials.
* **Stop tokens.** A completion ends at the tokenizer's EOS or at any EOS id in the checkpoint's
  ``generation_config`` (Llama-3-Instruct and Qwen-Instruct list several).
* **The distribution.** transformers 5 fills every unset ``generate`` argument from the checkpoint's
  ``generation_config`` (a Qwen2.5-Instruct ships ``top_k=20, top_p=0.8, repetition_penalty=1.05``), then from
  global defaults (``top_k=50``). PPO computes its ratios and KL against the full softmax at ``temperature``, so
  samples must come from exactly that: :func:`sample` hides the checkpoint's ``generation_config`` while it
  generates and sets every truncating or penalising option to its neutral value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from transformers import GenerationConfig

Prompt = str | list[dict]


def prompt_text(tokenizer, prompt: Prompt) -> str:
    """The text the model is conditioned on: plain prompts as they are, chats through the chat template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt, as TRL's DPOTrainer tokenizes them (chat templates carry their own specials)."""
    texts = [prompt_text(tokenizer, p) for p in prompts]
    add_special = [isinstance(p, str) for p in prompts]
    if all(add_special) or not any(add_special):
        return tokenizer(texts, add_special_tokens=add_special[0] if texts else True)["input_ids"]
    return [tokenizer(t, add_special_tokens=s)["input_ids"] for t, s in zip(texts, add_special, strict=True)]


def left_pad(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, attention_mask), so every row's generated tokens start at the same column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def length_batches(lengths: Sequence[int], max_rows: int, max_padding: float = 0.25) -> list[list[int]]:
    """Indices of ``lengths`` in batches of similar length: shortest first, at most ``max_rows`` a batch, and a batch
    is closed before the next (longer) row would make its padded size exceed ``1 + max_padding`` times its real
    tokens.

    Every padded position costs as much as a real one, and held-out prompts vary a lot in length (the real-model
    benchmark's 64 HH-RLHF eval prompts: 36 to 572 tokens): in one batch of 64 they are 36,608 positions for 10,783
    real tokens, in these batches 13,034. Where lengths are alike, batches stay full.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    batches: list[list[int]] = []
    batch: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        n = lengths[i]
        if batch and (len(batch) == max_rows or (len(batch) + 1) * n > (1 + max_padding) * (real + n)):
            batches.append(batch)
            batch, real = [], 0
        batch.append(i)
        real += n
    if batch:
        batches.append(batch)
    return batches


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, exactly as ``generate`` assigns them (so a forward pass over a sampled
    sequence scores it with the positions it was sampled at)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _hf_model(model):
    """The transformers model whose ``generation_config`` ``generate`` reads (under a PEFT wrapper, if any)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and every EOS id of the checkpoint's generation_config, sorted."""
    config = getattr(_hf_model(model), "generation_config", None)
    eos = config.eos_token_id if config is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# Every option of generate that reshapes the distribution, at its neutral value. Passed explicitly, because an option
# left unset is filled from the checkpoint's generation_config.
NEUTRAL_SAMPLING = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                        repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1)


def sampling_config(*, max_new_tokens: int, stop_ids: list[int], pad_id: int, temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0) -> GenerationConfig:
    """Sampling from ``softmax(logits / temperature)`` (optionally cut by ``top_k`` / ``top_p``: the caller's choice,
    never the checkpoint's); ``temperature=0`` decodes greedily. Every other option is neutral."""
    common = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_ids or None, pad_token_id=pad_id, use_cache=True)
    if temperature <= 0:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, **{**NEUTRAL_SAMPLING, **common, "temperature": temperature,
                                               "top_k": top_k, "top_p": top_p})


@contextlib.contextmanager
def _without_checkpoint_generation_config(model) -> Iterator[None]:
    """``generate`` fills unset options from ``model.generation_config``: show it a blank one meanwhile."""
    hf_model = _hf_model(model)
    saved = hf_model.generation_config
    hf_model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf_model.generation_config = saved


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """``model.generate`` with ``config`` alone deciding how tokens are drawn (prompt columns included in the
    result, as ``generate`` returns them)."""
    with _without_checkpoint_generation_config(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for the block and give the caller's random state back afterwards - the CUDA generator's too
    (``torch.manual_seed`` reseeds CUDA, so forking only the CPU generator would reset the caller's CUDA stream)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
