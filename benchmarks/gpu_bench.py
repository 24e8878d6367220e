"""GPU throughput and memory benchmark: our stage defaults (B) against plain TRL defaults (A), with MFU.

Every case trains (or generates with) a random-init Qwen2-shaped model built from a config — no Hub — on synthetic
preference data of fixed lengths (prompt 512 + response 512 tokens by default), and measures after warm-up steps:
tokens/s (non-pad tokens, counted by transformers' ``include_num_input_tokens_seen="non_padding"`` or, for GRPO, by
TRL's own prompt+completion counter), step time, peak memory (``max_memory_allocated`` / ``max_memory_reserved``),
and model FLOPs utilisation (formulas in ``benchmarks/flops.py``: 6N per trained token, 4N per token through a frozen
LoRA base, 2N per forward-only token, causal attention counted apart, LM head only where logits are computed).

Cases and variants (A = plain TRL, what ``XTrainer(model="path", args=XConfig(...))`` does; B = our stage config):

  dpo_lora      A, B, B_memory (our memory mode: + gradient checkpointing), B_precompute (+ precomputed ref log-probs)
  dpo_full      A, B
  reward_lora   A, B
  grpo_lora     A, B (rollout and update phases timed apart)
  ppo_lora      B only (TRL >= 1.13 has no PPO to compare with); rollout and update phases apart
  generation    A = dynamic KV cache, B = static cache (compiled forward on CUDA); reported as memory-bandwidth use

Variants of one case run alternately (A, B, ... then reversed in the next round) in one process, so drift in clocks
or temperature hits both sides. Batch size and gradient accumulation are the same for every variant of a case, so
"tokens per step" is equal and peak memory is comparable.

    python -m benchmarks.gpu_bench --tiny                                  # CPU smoke test, seconds
    python -m benchmarks.gpu_bench --size 1.5b --cases dpo_lora,dpo_full  # one H100: a few minutes per case

Results: ``benchmarks/results/gpu_bench_<size>.json`` (merged across invocations, so cases can be run one per call).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks.flops` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import PrinterCallback, TrainerCallback

from benchmarks.flops import (
    FORWARD,
    TRAIN,
    TRAIN_FROZEN,
    ModelShape,
    bandwidth_utilisation,
    decode_bytes,
    device_peak,
    mfu,
    sequence_flops,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
EOS, PAD = "<|endoftext|>", "<|pad|>"

# Qwen2-0.5B / Qwen2-1.5B shapes (their published configs), and a tiny one for the CPU smoke test.
MODEL_SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")  # identical in A and B


@dataclass
class BenchSettings:
    size: str = "1.5b"
    prompt_len: int = 512
    completion_len: int = 512
    batch_size: int = 4  # pairs (DPO, reward) or completions (GRPO, PPO) per micro-batch
    grad_accum: int = 2
    num_generations: int = 8  # GRPO group size
    warmup_steps: int = 2
    measure_steps: int = 5
    rounds: int = 1
    gen_batch_sizes: list[int] = field(default_factory=lambda: [16, 64])
    variants: list[str] | None = None  # run only these variants of each case (None = all)
    workdir: str = "/tmp/rlhf_lm_gpu_bench"
    device: str = "cuda"

    @classmethod
    def tiny(cls, **overrides) -> BenchSettings:
        base = cls(size="tiny", prompt_len=24, completion_len=16, batch_size=2, grad_accum=1, num_generations=2,
                   warmup_steps=1, measure_steps=2, gen_batch_sizes=[2], device="cpu")
        return replace(base, **overrides)

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.completion_len

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.measure_steps


# --------------------------------------------------------------------------------------------- synthetic assets
def numeric_tokenizer(vocab_size: int):
    """A word-level tokenizer whose tokens are the numbers 0..V-3 (plus EOS and pad): random token ids become text
    that TRL tokenizes back to exactly those ids, so the trainers run their normal text pipeline at the real vocab
    size (151,936) without a trained tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n = vocab_size - 2
    vocab = {str(i): i for i in range(n)} | {EOS: n, PAD: n + 1}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=EOS,
                                   model_max_length=1 << 20)


@dataclass
class Assets:
    policy_dir: Path
    reward_dir: Path
    tokenizer: object
    shape: ModelShape
    config: object


def build_assets(settings: BenchSettings) -> Assets:
    """Random-init Qwen2 causal LM and its one-label classifier twin, saved in bf16 like Hub checkpoints (cached)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config

    dims = MODEL_SIZES[settings.size]
    root = Path(settings.workdir) / settings.size
    tokenizer = numeric_tokenizer(dims["vocab_size"])
    config = Qwen2Config(**dims, tie_word_embeddings=True, max_position_embeddings=max(4096, 2 * settings.seq_len),
                         rope_theta=1e6, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, num_labels=1)
    init_device = settings.device if settings.device == "cuda" else "cpu"
    for name, auto_cls in (("policy", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        out = root / name
        if (out / "config.json").is_file():
            continue
        torch.manual_seed(0)
        with torch.device(init_device):
            model = auto_cls.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model
    return Assets(root / "policy", root / "reward", tokenizer, ModelShape.from_config(config), config)


def _random_text(rng, n_tokens: int, vocab: int) -> str:
    return " ".join(str(i) for i in rng.integers(0, vocab - 2, size=n_tokens))


def preference_rows(settings: BenchSettings, n_rows: int, vocab: int, seed: int = 0) -> list[dict]:
    """prompt_len-token prompts and (completion_len - 1)-token responses: TRL appends EOS, giving completion_len."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        prompt = _random_text(rng, settings.prompt_len, vocab) + " "
        rows.append({"prompt": prompt,
                     "chosen": _random_text(rng, settings.completion_len - 1, vocab),
                     "rejected": _random_text(rng, settings.completion_len - 1, vocab)})
    return rows


def prompt_rows(settings: BenchSettings, n_rows: int, vocab: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"prompt": _random_text(rng, settings.prompt_len, vocab)} for _ in range(n_rows)]


def synthetic_reward(completions, **kwargs) -> list[float]:
    """A cheap deterministic reward with spread (so advantages are not all zero); speed is all that matters here."""
    return [zlib.crc32(str(c).encode()) % 1000 / 1000.0 for c in completions]


# ------------------------------------------------------------------------------------------------ measurement
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Marks (time, tokens seen) at the end of every optimizer step, after a device sync."""

    def __init__(self, device: str):
        self.device = device
        self.marks: list[tuple[float, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.device)
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    def window(self, warmup: int) -> tuple[float, int, int]:
        """(seconds, tokens, steps) from the end of warm-up step ``warmup`` (>= 1) to the end of the last step."""
        if warmup < 1 or len(self.marks) <= warmup:
            raise RuntimeError(f"{len(self.marks)} steps ran; need at least one warm-up step and one measured step")
        (t0, n0), (t1, n1) = self.marks[warmup - 1], self.marks[-1]
        return t1 - t0, n1 - n0, len(self.marks) - warmup


class PhaseTimer:
    """Times calls of one bound method (e.g. GRPO's rollout) by wrapping it on the instance."""

    def __init__(self, obj, method: str, device: str):
        self.seconds: list[float] = []
        original = getattr(obj, method)

        def timed(*args, **kwargs):
            _sync(device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            _sync(device)
            self.seconds.append(time.perf_counter() - start)
            return out

        setattr(obj, method, timed)


@contextlib.contextmanager
def timed_class_method(cls, method: str, device: str, sink: list[float]):
    """Time a method called during construction (DPO precomputes reference log-probs in ``__init__``)."""
    original = getattr(cls, method)

    def timed(self, *args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = original(self, *args, **kwargs)
        _sync(device)
        sink.append(time.perf_counter() - start)
        return out

    setattr(cls, method, timed)
    try:
        yield
    finally:
        setattr(cls, method, original)


def memory_stats(device: str) -> dict:
    if device != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def lora_param_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def common_args(settings: BenchSettings, output_dir: Path) -> dict:
    """Arguments both sides share, so A and B differ only in what the defaults differ in."""
    return dict(output_dir=str(output_dir), per_device_train_batch_size=settings.batch_size,
                gradient_accumulation_steps=settings.grad_accum, max_steps=settings.total_steps,
                save_strategy="no", report_to="none", include_num_input_tokens_seen="non_padding", seed=0,
                disable_tqdm=True, use_cpu=settings.device == "cpu", dataloader_drop_last=True)


# ---------------------------------------------------------------------------------- B configs (our defaults)
# B is our stage exactly as it ships: its CONFIG class with only the benchmark's shape fields set, and its model
# loading. Each further B_* variant adds one change we recommend, so its measured effect reads off the table.
VARIANT_CHANGES: dict[str, dict] = {
    "B": {},
    "B_bf16": {"dtype": "bfloat16"},  # frozen base weights in bf16 instead of ModelConfig's float32
    "B_memory": {"dtype": "bfloat16", "activation_checkpointing": True},  # our memory mode
    "B_precompute": {"dtype": "bfloat16", "precompute_ref_log_probs": True},
    "B_liger": {"dtype": "bfloat16", "use_liger_kernel": True},
    "B_memory_liger": {"dtype": "bfloat16", "activation_checkpointing": True, "use_liger_kernel": True},
    "B_precompute_liger": {"dtype": "bfloat16", "precompute_ref_log_probs": True, "use_liger_kernel": True},
}
# Full fine-tuning keeps fp32 master weights (bf16 AdamW updates lose precision): the changes touch the reference.
FULL_VARIANT_CHANGES: dict[str, dict] = {
    "B": {},
    "B_bf16_ref": {"ref_dtype": "bfloat16"},  # the frozen reference only runs forward: bf16 halves it
    "B_precompute": {"precompute_ref_log_probs": True},  # no reference model in memory during training at all
}


class Skipped(Exception):
    """A variant that cannot run here (its stage is not in the tree, an optional kernel is not installed)."""


def our_config(module: str, fields: dict, changes: dict):
    """Our stage's CONFIG built from the benchmark's ``fields`` plus a variant's ``changes``; (config, source)."""
    import dataclasses
    import importlib
    import importlib.util

    if changes.get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        raise Skipped("liger-kernel is not installed (pip install 'rlhf-lm[liger]')")
    try:
        config_cls = importlib.import_module(module).CONFIG
    except (ImportError, AttributeError) as e:
        raise Skipped(f"{module}.CONFIG is not importable: {e}") from e
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    values = {k: v for k, v in {**fields, **changes}.items() if k in names}
    return config_cls(**values), f"{module}.CONFIG" + "".join(f" +{k}={v}" for k, v in changes.items())


def checkpointing_of(args) -> bool:
    """What the trainer will do: transformers 5 reads ``activation_checkpointing`` (``gradient_checkpointing`` is
    its deprecated alias, copied over only at construction)."""
    return bool(getattr(args, "activation_checkpointing", args.gradient_checkpointing))


def _weights_dtype(model) -> str:
    return str(next(p for p in model.parameters() if not p.requires_grad).dtype)


# ----------------------------------------------------------------------------------------------------- cases
@dataclass
class Run:
    """What one variant of a case built: the trainer, and how to turn its counted tokens into model FLOPs."""

    trainer: object
    row_tokens: int  # non-pad tokens the counter sees per row (a pair = 2 sequences for DPO / reward)
    row_flops: int  # model FLOPs per row
    source: str
    notes: dict = field(default_factory=dict)
    phase: PhaseTimer | None = None  # the rollout phase of an online trainer
    generation: PhaseTimer | None = None  # the generate calls inside it
    generation_batch: int = 0


def _lora(task_type: str, **extra):
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, bias="none", **LORA, **extra)


def _stage_fields(common: dict, model_dir: Path, **extra) -> dict:
    return dict(common, model_name_or_path=str(model_dir), dataset_name=str(model_dir), reward_model="gold", **extra)


def build_dpo(settings: BenchSettings, assets: Assets, variant: str, out: Path, full: bool) -> Run:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf_lm.modeling import load_causal_lm

    n_rows = settings.total_steps * settings.batch_size * settings.grad_accum
    dataset = Dataset.from_list(preference_rows(settings, n_rows, assets.config.vocab_size))
    common = dict(common_args(settings, out), max_length=settings.seq_len)
    ref_model, trainer_cls = None, DPOTrainer
    if variant == "A":
        # Plain TRL: the model as a path, so TRL loads it (fp32 weights, bf16 autocast, gradient checkpointing on).
        args, source, model = DPOConfig(**common), "trl.DPOConfig defaults", str(assets.policy_dir)
        peft_config = None if full else _lora("CAUSAL_LM")
    else:
        changes = (FULL_VARIANT_CHANGES if full else VARIANT_CHANGES)[variant]
        args, source = our_config("rlhf_lm.stages.dpo", _stage_fields(common, assets.policy_dir, use_peft=not full),
                                  changes)
        # the stage's own trainer class and loading: policy, reference, LoRA config
        from rlhf_lm.modeling import load_policy_and_reference
        from rlhf_lm.trainers import DPOTrainer as trainer_cls

        model, ref_model, peft_config = load_policy_and_reference(args)
        if changes.get("ref_dtype"):
            ref_model = load_causal_lm(str(assets.policy_dir), dtype=changes["ref_dtype"])
    precompute_s: list[float] = []
    with timed_class_method(DPOTrainer, "_precompute_ref_logps", settings.device, precompute_s):
        trainer = trainer_cls(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                              processing_class=assets.tokenizer, peft_config=peft_config)
    s, c = settings.seq_len, settings.completion_len
    mode = TRAIN if full else TRAIN_FROZEN
    policy = 2 * sequence_flops(assets.shape, s, mode, head_tokens=c, lora_params=lora_param_count(trainer.model))
    reference = 0 if args.precompute_ref_log_probs else 2 * sequence_flops(assets.shape, s, FORWARD, head_tokens=c)
    notes = {"activation_checkpointing": checkpointing_of(args), "bf16_autocast": bool(args.bf16),
             "precompute_ref_log_probs": args.precompute_ref_log_probs, "pad_to_multiple_of": args.pad_to_multiple_of,
             "weights_dtype": str(next(trainer.model.parameters()).dtype if full else _weights_dtype(trainer.model)),
             "ref_dtype": str(next(trainer.ref_model.parameters()).dtype) if trainer.ref_model is not None else None}
    if precompute_s:
        notes["precompute_s"] = sum(precompute_s)
        notes["precompute_rows"] = n_rows
        notes["precompute_flops"] = n_rows * 2 * sequence_flops(assets.shape, s, FORWARD, head_tokens=c)
    return Run(trainer, 2 * s, policy + reference, source, notes)


def build_reward(settings: BenchSettings, assets: Assets, variant: str, out: Path) -> Run:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rlhf_lm.modeling import load_sequence_classifier

    n_rows = settings.total_steps * settings.batch_size * settings.grad_accum
    dataset = Dataset.from_list(preference_rows(settings, n_rows, assets.config.vocab_size))
    common = dict(common_args(settings, out), max_length=settings.seq_len)
    trainer_cls = RewardTrainer
    if variant == "A":
        args, source, model = RewardConfig(**common), "trl.RewardConfig defaults", str(assets.reward_dir)
    else:
        args, source = our_config("rlhf_lm.stages.reward", _stage_fields(common, assets.reward_dir),
                                  VARIANT_CHANGES[variant])
        from rlhf_lm.trainers import RewardTrainer as trainer_cls  # the stage's own trainer class

        model = load_sequence_classifier(str(assets.reward_dir), dtype=args.dtype)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=assets.tokenizer,
                          peft_config=_lora("SEQ_CLS", modules_to_save=["score"]))
    s = settings.seq_len
    row = 2 * sequence_flops(assets.shape, s, TRAIN_FROZEN, head_tokens=0, lora_params=lora_param_count(trainer.model))
    notes = {"activation_checkpointing": checkpointing_of(args), "bf16_autocast": bool(args.bf16),
             "weights_dtype": _weights_dtype(trainer.model)}
    return Run(trainer, 2 * s, row, source, notes)


def build_grpo(settings: BenchSettings, assets: Assets, variant: str, out: Path) -> Run:
    from datasets import Dataset
    from peft import get_peft_model
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_lm.modeling import load_causal_lm

    completions_per_step = settings.batch_size * settings.grad_accum
    n_prompts = settings.total_steps * completions_per_step // settings.num_generations + 1
    dataset = Dataset.from_list(prompt_rows(settings, n_prompts, assets.config.vocab_size))
    # GRPO counts its prompt + completion tokens itself; transformers' counter cannot see its prompt-only batches.
    # Fixed-length completions (min_new_tokens) keep the token count and FLOPs per row exact on random weights.
    common = dict(common_args(settings, out), include_num_input_tokens_seen="no", logging_steps=1,
                  num_generations=settings.num_generations, max_completion_length=settings.completion_len,
                  generation_kwargs={"min_new_tokens": settings.completion_len})
    peft_config = None
    if variant == "A":
        args, source, model = GRPOConfig(**common), "trl.GRPOConfig defaults", str(assets.policy_dir)
        peft_config = _lora("CAUSAL_LM")
    else:
        args, source = our_config("rlhf_lm.stages.grpo", _stage_fields(common, assets.policy_dir),
                                  VARIANT_CHANGES[variant])
        model = get_peft_model(load_causal_lm(str(assets.policy_dir), dtype=args.dtype or "auto"), _lora("CAUSAL_LM"))
    trainer = GRPOTrainer(model=model, reward_funcs=synthetic_reward, args=args, train_dataset=dataset,
                          processing_class=assets.tokenizer, peft_config=peft_config)
    s, c = settings.seq_len, settings.completion_len
    row = sequence_flops(assets.shape, s, FORWARD, head_tokens=c)  # generation: every token through the model once
    row += sequence_flops(assets.shape, s, TRAIN_FROZEN, head_tokens=c, lora_params=lora_param_count(trainer.model))
    if args.beta:
        row += sequence_flops(assets.shape, s, FORWARD, head_tokens=c)  # reference log-probs
    if args.num_iterations > 1 or args.steps_per_generation > args.gradient_accumulation_steps:
        row += sequence_flops(assets.shape, s, FORWARD, head_tokens=c)  # old-policy log-probs
    phase = PhaseTimer(trainer, "_generate_and_score_completions", settings.device)
    generation = PhaseTimer(trainer, "_generate_single_turn", settings.device)
    notes = {"activation_checkpointing": checkpointing_of(args), "bf16_autocast": bool(args.bf16), "beta": args.beta,
             "weights_dtype": _weights_dtype(trainer.model)}
    return Run(trainer, s, row, source, notes, phase, generation, args.generation_batch_size)


TRAINER_CASES: dict[str, tuple[list[str], Callable]] = {
    "dpo_lora": (["A", "B", "B_bf16", "B_memory", "B_precompute", "B_liger", "B_memory_liger", "B_precompute_liger"],
                 lambda s, a, v, o: build_dpo(s, a, v, o, full=False)),
    "dpo_full": (["A", "B", "B_bf16_ref", "B_precompute"], lambda s, a, v, o: build_dpo(s, a, v, o, full=True)),
    # No B_liger: the reward stage refuses use_liger_kernel (it crashed the reward model on the H200).
    "reward_lora": (["A", "B", "B_bf16"], build_reward),
    "grpo_lora": (["A", "B", "B_bf16"], build_grpo),
}


def measure_trainer_variant(settings: BenchSettings, assets: Assets, case: str, variant: str, peak) -> dict:
    free_memory(settings.device)
    out = Path(settings.workdir) / "runs" / f"{case}_{variant}"
    build = TRAINER_CASES[case][1]
    start = time.perf_counter()
    run = build(settings, assets, variant, out)
    setup_s = time.perf_counter() - start
    timer = StepTimer(settings.device)
    run.trainer.add_callback(timer)
    run.trainer.remove_callback(PrinterCallback)
    run.trainer.train()
    # Checkpointing as the model actually ran (set up by Trainer.train), not just as configured.
    run.notes["model_checkpointing"] = bool(getattr(run.trainer.model, "is_activation_checkpointing", None))
    seconds, tokens, steps = timer.window(settings.warmup_steps)
    rows = tokens / run.row_tokens
    model_flops = rows * run.row_flops
    result = {
        "source": run.source, "setup_s": setup_s, "steps_measured": steps, "step_time_s": seconds / steps,
        "tokens_per_s": tokens / seconds, "tokens_per_step": tokens / steps, "model_tflops_per_s":
        model_flops / seconds / 1e12, "mfu": mfu(model_flops, seconds, peak.bf16_flops), **memory_stats(settings.device),
        **run.notes,
    }
    if run.phase is not None:
        rollout = sum(run.phase.seconds[-steps:])
        result.update(rollout_s_per_step=rollout / steps, update_s_per_step=(seconds - rollout) / steps)
    if run.generation is not None:
        result.update(generation_stats(settings, assets, run.trainer.model, run.generation.seconds[-steps:],
                                       run.generation_batch, peak))
    if "precompute_s" in run.notes:
        # Reference log-probs are computed once per dataset and reused every epoch: amortise them honestly.
        per_row_train = seconds / rows
        per_row_pre = run.notes["precompute_s"] / run.notes["precompute_rows"]
        for epochs in (1, 3):
            result[f"tokens_per_s_incl_precompute_{epochs}ep"] = run.row_tokens / (per_row_train + per_row_pre / epochs)
    del run
    free_memory(settings.device)
    return result


def generation_stats(settings: BenchSettings, assets: Assets, model, seconds: list[float], batch: int,
                     peak) -> dict:
    """Bandwidth use of the generate calls inside a rollout: the bytes every decoding step must read (all weights
    as stored, plus the batch's KV cache) over the whole call's time, prefill included (so a slight underestimate)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    steps = settings.completion_len - 1
    moved = decode_bytes(weight_bytes, assets.shape.kv_bytes_per_token(2), batch, settings.prompt_len, steps)
    per_call = sum(seconds) / len(seconds)
    return {"generation_s_per_step": sum(seconds) / max(len(seconds), 1), "generation_batch": batch,
            "generation_decode_step_ms": 1e3 * per_call / steps,
            "generation_mbu": bandwidth_utilisation(moved, per_call, peak.hbm_bytes_per_s)}


def measure_generation(settings: BenchSettings, assets: Assets, variant: str, peak, batch: int) -> dict:
    """Decode speed as memory-bandwidth utilisation: (weights + KV cache read per step) / step time / peak bandwidth.

    Decode time = time(generate N new tokens) - time(generate 1 new token), so prefill is excluded."""
    from rlhf_lm.modeling import load_causal_lm

    free_memory(settings.device)
    model = load_causal_lm(str(assets.policy_dir), dtype="auto").to(settings.device).eval()
    ids = torch.randint(0, assets.config.vocab_size - 2, (batch, settings.prompt_len), device=settings.device)
    new = settings.completion_len
    kwargs = dict(do_sample=True, pad_token_id=assets.tokenizer.pad_token_id, eos_token_id=None)
    if variant == "B_static":
        kwargs["cache_implementation"] = "static"

    def generate(n: int) -> float:
        _sync(settings.device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kwargs)
        _sync(settings.device)
        return time.perf_counter() - start

    generate(new)  # warm-up (and compilation for the static cache on CUDA)
    prefill_s = min(generate(1) for _ in range(2))
    full_s = min(generate(new) for _ in range(2))
    decode_s = max(full_s - prefill_s, 1e-9)
    steps = new - 1
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    moved = decode_bytes(weight_bytes, assets.shape.kv_bytes_per_token(2), batch, settings.prompt_len, steps)
    result = {"batch": batch, "prefill_s": prefill_s, "decode_step_ms": 1e3 * decode_s / steps,
              "decode_tokens_per_s": batch * steps / decode_s, "bytes_per_step": moved / steps,
              "mbu": bandwidth_utilisation(moved, decode_s, peak.hbm_bytes_per_s), **memory_stats(settings.device),
              "cache": kwargs.get("cache_implementation", "dynamic")}
    return result  # the model is freed with this frame; the next measurement starts with free_memory()


def measure_ppo(settings: BenchSettings, assets: Assets, variant: str, peak) -> dict:
    """Our PPO (rlhf_lm.ppo): one step = rollout (generate + policy/value/reference forwards + reward) then
    num_ppo_epochs passes of clipped updates. Timed apart by wrapping the trainer module's ``collect_rollout``."""
    try:
        import rlhf_lm.ppo.trainer as ppo_trainer
        from rlhf_lm.ppo import PPOTrainer
    except ImportError as e:
        raise Skipped(f"rlhf_lm.ppo is not importable: {e}") from e
    from peft import get_peft_model

    from rlhf_lm.modeling import load_causal_lm
    from rlhf_lm.rewards import FunctionReward

    free_memory(settings.device)
    out = Path(settings.workdir) / "runs" / f"ppo_lora_{variant}"
    ppo_fields = dict(rollout_batch_size=settings.batch_size * settings.grad_accum, max_new_tokens=settings.completion_len,
                      max_prompt_length=settings.prompt_len, per_device_eval_batch_size=settings.batch_size)
    args, source = our_config("rlhf_lm.stages.ppo", _stage_fields(dict(common_args(settings, out), **ppo_fields),
                                                                  assets.policy_dir), VARIANT_CHANGES[variant])
    # As the stage does: load with the config's dtype, wrap with LoRA, hand the PeftModel to our PPOTrainer.
    model = get_peft_model(load_causal_lm(str(assets.policy_dir), dtype=args.dtype or "auto"), _lora("CAUSAL_LM"))
    n_prompts = settings.total_steps * args.rollout_batch_size
    prompts = [row["prompt"] for row in prompt_rows(settings, n_prompts, assets.config.vocab_size)]
    reward = FunctionReward(lambda p, c: synthetic_reward(c), batched=True, name="synthetic")
    timer = StepTimer(settings.device)
    trainer = PPOTrainer(model, args, processing_class=assets.tokenizer, reward_model=reward, train_prompts=prompts,
                         callbacks=[timer])
    generation = PhaseTimer(trainer.unwrapped.policy, "generate", settings.device)
    rollout_s: list[float] = []
    tokens: list[int] = []  # non-pad prompt + response tokens of each rollout
    original = ppo_trainer.collect_rollout

    def timed_rollout(*a, **kw):
        _sync(settings.device)
        start = time.perf_counter()
        rollout = original(*a, **kw)
        _sync(settings.device)
        rollout_s.append(time.perf_counter() - start)
        tokens.append(int(rollout.attention_mask.sum()))
        return rollout

    ppo_trainer.collect_rollout = timed_rollout
    try:
        trainer.train()
    finally:
        ppo_trainer.collect_rollout = original
    w, steps = settings.warmup_steps, settings.measure_steps
    seconds = timer.marks[-1][0] - timer.marks[w - 1][0]
    n_tokens = sum(tokens[w:])
    rows = steps * args.rollout_batch_size
    s, c = settings.seq_len, settings.completion_len
    lora = lora_param_count(model)
    row_flops = 3 * sequence_flops(assets.shape, s, FORWARD, head_tokens=c)  # generate, policy+value, reference
    row_flops += args.num_ppo_epochs * sequence_flops(assets.shape, s, TRAIN_FROZEN, head_tokens=c, lora_params=lora)
    rollout = sum(rollout_s[w:])
    result = {"source": source, "steps_measured": steps, "step_time_s": seconds / steps,
              "tokens_per_s": n_tokens / seconds, "tokens_per_step": n_tokens / steps,
              "rollout_s_per_step": rollout / steps, "update_s_per_step": (seconds - rollout) / steps,
              "model_tflops_per_s": rows * row_flops / seconds / 1e12, "mfu": mfu(rows * row_flops, seconds,
                                                                                  peak.bf16_flops),
              "num_ppo_epochs": args.num_ppo_epochs, "activation_checkpointing": checkpointing_of(args),
              "bf16_autocast": bool(args.bf16), "weights_dtype": _weights_dtype(model),
              **generation_stats(settings, assets, model, generation.seconds[w:], args.rollout_batch_size, peak),
              **memory_stats(settings.device)}
    del trainer, model
    free_memory(settings.device)
    return result


HH_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"


def measure_padding(pairs_path: Path = HH_PAIRS, vocab_size: int = 16000, max_length: int = 1024,
                    batch_sizes: tuple[int, ...] = (4, 8, 16), seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Share of DPO batch positions that are padding on real HH-RLHF pairs: random vs length-grouped batches, with
    and without padding to a multiple of 64. Needs no GPU: padding wastes the same share of FLOPs on any device.

    Lengths come from a byte-level BPE trained on the pairs themselves (``vocab_size`` tokens), a stand-in for a
    model tokenizer (none can be downloaded here); sequences are capped at ``max_length`` as DPO truncates them.
    """
    from benchmarks.padding import dpo_padding_fraction
    from rlhf_lm.data import load_rows, normalize_preferences
    from rlhf_lm.modeling import train_tokenizer

    pairs, _ = normalize_preferences(load_rows(str(pairs_path)), "hh_rlhf")
    tokenizer = train_tokenizer((t for row in pairs for t in (row["prompt"] + row["chosen"], row["rejected"])),
                                vocab_size=vocab_size)

    def lengths(column: str) -> list[int]:
        texts = [p + c for p, c in zip(pairs["prompt"], pairs[column])]
        return [min(len(ids) + 1, max_length) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    chosen, rejected = lengths("chosen"), lengths("rejected")
    table = {}
    for batch in batch_sizes:
        for grouped in (False, True):
            for multiple in (None, 8, 64):
                fractions = [dpo_padding_fraction(chosen, rejected, batch, grouped, multiple, seed) for seed in seeds]
                key = f"bs{batch}_{'grouped' if grouped else 'random'}_{f'pad{multiple}' if multiple else 'nopad'}"
                table[key] = statistics.mean(fractions)
    return {"benchmark": "dpo_padding", "data": str(pairs_path.relative_to(pairs_path.parents[3])),
            "pairs": len(chosen), "tokenizer": f"byte-level BPE, {vocab_size} tokens, trained on the pairs",
            "max_length": max_length, "seeds": list(seeds), "mean_sequence_tokens": statistics.mean(chosen + rejected),
            "padding_fraction": table}


# ----------------------------------------------------------------------------------------------------- report
def library_versions() -> dict:
    import importlib.metadata as md

    names = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "flash-attn"]
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    versions["python"] = platform.python_version()
    return versions


def summarise(runs: list[dict]) -> dict:
    """Median of the numeric fields over rounds (runs that errored are listed apart)."""
    ok = [r for r in runs if "error" not in r and "skipped" not in r]
    if not ok:
        return runs[-1]
    summary = {}
    for key, value in ok[0].items():
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        summary[key] = statistics.median(values) if len(values) == len(ok) else value
    summary["rounds"] = len(ok)
    return summary


def add_ratios(by_variant: dict) -> None:
    """B-side / A-side tokens/s and peak memory, pairing ``X`` with ``A`` and ``X_bsN`` with ``A_bsN``."""
    ratios = {}
    for name, result in by_variant.items():
        kind, _, suffix = name.partition("_bs")
        baseline = by_variant.get(f"A_bs{suffix}" if suffix else "A")
        if kind == "A" or baseline is None:
            continue
        speed = "decode_tokens_per_s" if suffix else "tokens_per_s"
        ratios[name] = {"tokens_per_s": _ratio(baseline.get(speed), result.get(speed)),
                        "peak_allocated": _ratio(baseline.get("peak_allocated_gib"), result.get("peak_allocated_gib"))}
    if ratios:
        by_variant["ratios_vs_A"] = ratios


def _ratio(a, b):
    return None if a in (None, 0) or b is None else b / a


def check_targets(cases: dict, size: str) -> list[dict]:
    """The issue's targets against what was measured (None = not measured in this run)."""
    def get(case, variant, key):
        return cases.get(case, {}).get(variant, {}).get(key)

    def target(name, value, ok):
        status = "not measured" if value is None else ("met" if ok(value) else "missed")
        return {"target": name, "measured": value, "status": status}

    dpo_a, dpo_mem = get("dpo_lora", "A", "peak_allocated_gib"), get("dpo_lora", "B_memory", "peak_allocated_gib")
    return [
        target("DPO-LoRA tokens/s >= 2x plain TRL",
               _ratio(get("dpo_lora", "A", "tokens_per_s"), get("dpo_lora", "B", "tokens_per_s")), lambda v: v >= 2),
        target("DPO-LoRA MFU >= 0.40", get("dpo_lora", "B", "mfu"), lambda v: v >= 0.40),
        target("DPO full MFU >= 0.45", get("dpo_full", "B", "mfu"), lambda v: v >= 0.45),
        target("reward-model LoRA MFU >= 0.40", get("reward_lora", "B", "mfu"), lambda v: v >= 0.40),
        target("our PPO tokens/s >= 0.6x our GRPO",
               _ratio(get("grpo_lora", "B", "tokens_per_s"), get("ppo_lora", "B", "tokens_per_s")), lambda v: v >= 0.6),
        target("generation (best batch / cache) >= 0.30 of memory bandwidth",
               max([v.get("mbu") or 0 for k, v in cases.get("generation", {}).items() if k != "ratios_vs_A"] or [0])
               or None, lambda v: v >= 0.30),
        target("DPO-LoRA peak memory (memory mode) <= 0.5x plain TRL", _ratio(dpo_a, dpo_mem), lambda v: v <= 0.5),
    ] if size == "1.5b" else []


def quiet_libraries() -> None:
    """Progress bars and per-step log dicts would bury the benchmark's own lines."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_benchmark(settings: BenchSettings, cases: list[str], output: Path | None = None) -> dict:
    """Measure ``cases`` under ``settings``, write the JSON report (merged into an existing one) and return it."""
    quiet_libraries()
    if settings.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device_name = torch.cuda.get_device_name() if settings.device == "cuda" else f"cpu ({platform.processor()})"
    peak = device_peak(device_name)
    assets = build_assets(settings)
    measured: dict[str, dict[str, list[dict]]] = {}
    output = output or RESULTS_DIR / f"gpu_bench_{settings.size}.json"
    report = write_report(output, settings, assets, device_name, peak, {})  # earlier cases, before any new one
    for case in cases:
        if case == "generation":
            variants = [f"{v}_bs{b}" for b in settings.gen_batch_sizes for v in ("A", "B_static")]
        elif case == "ppo_lora":
            variants = ["B", "B_bf16"]
        else:
            variants = TRAINER_CASES[case][0]
        if settings.variants is not None:
            variants = [v for v in variants if v.partition("_bs")[0] in settings.variants]
        measured[case] = {v: [] for v in variants}
        for round_ in range(settings.rounds):
            for variant in variants if round_ % 2 == 0 else variants[::-1]:
                print(f"[gpu_bench] {settings.size} {case} {variant} round {round_ + 1}", flush=True)
                try:
                    if case == "generation":
                        kind, batch = variant.split("_bs")
                        result = measure_generation(settings, assets, kind, peak, int(batch))
                    elif case == "ppo_lora":
                        result = measure_ppo(settings, assets, variant, peak)
                    else:
                        result = measure_trainer_variant(settings, assets, case, variant, peak)
                except Skipped as e:
                    result = {"skipped": str(e)}
                except Exception as e:  # an OOM in one variant must not lose the others' results
                    traceback.print_exc()
                    result = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                    free_memory(settings.device)
                measured[case][variant].append(result)
        # Written after every case: a run stopped by a time limit keeps the cases it finished.
        report = write_report(output, settings, assets, device_name, peak, {case: measured[case]})
    return report


def write_report(output: Path, settings: BenchSettings, assets: Assets, device_name: str, peak,
                 measured: dict[str, dict[str, list[dict]]]) -> dict:
    """Merge ``measured`` into the JSON at ``output`` (what earlier invocations measured on the same device stays,
    re-measured variants are replaced), recompute ratios and targets, write it and return it."""
    cases_out = {case: {v: summarise(runs) for v, runs in by_variant.items()} for case, by_variant in measured.items()}
    case_settings = {case: asdict(settings) for case in cases_out}
    if output.is_file():
        previous = json.loads(output.read_text())
        if previous.get("device") == device_name:  # variants re-measured here replace theirs; the others stay
            old_cases = previous.get("cases", {})
            cases_out = {**old_cases, **{case: {**old_cases.get(case, {}), **variants}
                                         for case, variants in cases_out.items()}}
            case_settings = {**previous.get("case_settings", {}), **case_settings}
    for by_variant in cases_out.values():
        by_variant.pop("ratios_vs_A", None)
        add_ratios(by_variant)
    report = {
        "benchmark": "gpu_bench", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device_name, "peak": asdict(peak), "versions": library_versions(), "settings": asdict(settings),
        "model": {"size": settings.size, "body_params": assets.shape.body_params,
                  "head_params": assets.shape.head_params, **MODEL_SIZES[settings.size]},
        "cases": cases_out,
        # Invocations may differ in steps or batch sizes (the online cases take fewer steps): each case keeps its own.
        "case_settings": case_settings,
    }
    report["targets"] = check_targets(report["cases"], settings.size)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[gpu_bench] wrote {output}", flush=True)
    return report


def merge_reports(reports: list[dict]) -> dict:
    """One report holding the cases of several runs on one device (later files win), with targets re-checked."""
    devices = {r["device"] for r in reports}
    if len(devices) != 1:
        raise SystemExit(f"refusing to merge results from different devices: {sorted(devices)}")
    merged = dict(reports[-1], cases={})
    for report in reports:
        merged["cases"].update(report["cases"])
    merged["targets"] = check_targets(merged["cases"], merged["settings"]["size"])
    return merged


ALL_CASES = ["dpo_lora", "dpo_full", "reward_lora", "grpo_lora", "ppo_lora", "generation"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="Merge the cases of result files from separate runs (same device) into --output.")
    parser.add_argument("--padding", action="store_true",
                        help="Measure DPO batch padding on real HH-RLHF pairs (CPU) and write results/dpo_padding.json.")
    parser.add_argument("--tiny", action="store_true", help="Tiny model on CPU: a smoke test of every code path.")
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="1.5b")
    parser.add_argument("--cpu", action="store_true", help="Run --size on CPU anyway (slow; checks the code path).")
    parser.add_argument("--prompt-len", type=int, help="Prompt tokens (default 512).")
    parser.add_argument("--completion-len", type=int, help="Response tokens, EOS included (default 512).")
    parser.add_argument("--cases", default=",".join(ALL_CASES), help=f"Comma-separated subset of {ALL_CASES}.")
    parser.add_argument("--variants", help="Comma-separated subset of variants (A, B, B_bf16, ...); default all.")
    parser.add_argument("--rounds", type=int, default=1, help="Alternating A/B rounds per case (median reported).")
    parser.add_argument("--batch-size", type=int, help="Micro-batch size (pairs or completions).")
    parser.add_argument("--grad-accum", type=int)
    parser.add_argument("--measure-steps", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--gen-batch-sizes", help="Comma-separated batch sizes of the generation case (default 16,64).")
    parser.add_argument("--workdir", help="Where models and trainer outputs go (default /tmp/rlhf_lm_gpu_bench).")
    parser.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/gpu_bench_<size>.json).")
    args = parser.parse_args(argv)
    if args.merge:
        merged = merge_reports([json.loads(p.read_text()) for p in args.merge])
        out = args.output or RESULTS_DIR / f"gpu_bench_{merged['settings']['size']}.json"
        out.write_text(json.dumps(merged, indent=2) + "\n")
        print(f"[gpu_bench] merged {len(args.merge)} files into {out}")
        return 0
    if args.padding:
        quiet_libraries()
        report = measure_padding()
        out = args.output or RESULTS_DIR / "dpo_padding.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["padding_fraction"], indent=2))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(ALL_CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {ALL_CASES}")
    if args.tiny or args.size == "tiny":
        settings = BenchSettings.tiny()
    else:
        if not (torch.cuda.is_available() or args.cpu):
            parser.error(f"--size {args.size} needs a CUDA GPU; use --tiny (or --cpu) on CPU")
        settings = BenchSettings(size=args.size, device="cpu" if args.cpu else "cuda")
    overrides = {k: v for k, v in dict(rounds=args.rounds, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                       prompt_len=args.prompt_len, completion_len=args.completion_len,
                                       measure_steps=args.measure_steps, warmup_steps=args.warmup_steps,
                                       workdir=args.workdir).items() if v is not None}
    if args.gen_batch_sizes:
        overrides["gen_batch_sizes"] = [int(b) for b in args.gen_batch_sizes.split(",")]
    if args.variants:
        overrides["variants"] = [v.strip() for v in args.variants.split(",") if v.strip()]
    settings = replace(settings, **overrides)
    run_benchmark(settings, cases, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
