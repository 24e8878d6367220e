"""The GPU benchmark: FLOP / MFU / bandwidth math against hand-computed values and PyTorch's FLOP counter, a CPU
smoke run at tiny sizes, and (marked gpu) the real 1.5B run."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.flops import (  # noqa: E402
    FORWARD,
    TRAIN,
    TRAIN_FROZEN,
    ModelShape,
    bandwidth_utilisation,
    causal_attention_flops,
    decode_bytes,
    device_peak,
    matmul_flops,
    mfu,
    sequence_flops,
)

# 2 layers, d=16, 4 heads of 4 (attn_dim 16), 2 KV heads (kv_dim 8), d_ff=32, vocab 50.
SMALL = ModelShape(n_layers=2, d_model=16, n_heads=4, n_kv_heads=2, head_dim=4, d_ff=32, vocab_size=50)


# ------------------------------------------------------------------------------------------- pure formulas
def test_parameter_counts_by_hand():
    # q, o: 16x16 each; k, v: 16x8 each -> 512 + 256 = 768; SwiGLU 3 x 16 x 32 = 1536; per layer 2304
    assert SMALL.layer_params == 2304
    assert SMALL.body_params == 4608
    assert SMALL.head_params == 800
    assert SMALL.kv_bytes_per_token(2) == 2 * 2 * 2 * 4 * 2  # k and v, 2 layers, 2 kv heads, head_dim 4, bf16


def test_qwen2_1_5b_shape_matches_its_published_size():
    from transformers import Qwen2Config

    from benchmarks.gpu_bench import MODEL_SIZES

    shape = ModelShape.from_config(Qwen2Config(**MODEL_SIZES["1.5b"]))
    # per layer: 2*1536*1536 + 2*1536*256 + 3*1536*8960 = 46,792,704
    assert shape.body_params == 28 * 46_792_704
    assert shape.head_params == 151_936 * 1536
    # body + (tied) embeddings ~ 1.54B, the size Qwen2-1.5B reports (biases and norms aside)
    assert 1.53e9 < shape.body_params + shape.head_params < 1.55e9


def test_matmul_and_attention_flops_by_hand():
    assert matmul_flops(10, 3, FORWARD) == 60
    assert matmul_flops(10, 3, TRAIN_FROZEN) == 120
    assert matmul_flops(10, 3, TRAIN) == 180
    # causal, S=3: queries see 1, 2, 3 keys; 4 * layers(2) * attn_dim(16) * (1+2+3) = 768 forward
    assert causal_attention_flops(SMALL, 3, FORWARD) == 768
    assert causal_attention_flops(SMALL, 3, TRAIN_FROZEN) == 3 * 768
    assert causal_attention_flops(SMALL, 3, TRAIN) == 3 * 768


def test_sequence_flops_by_hand():
    # forward, 3 tokens, 2 through the head: 2*4608*3 + 768 + 2*800*2
    assert sequence_flops(SMALL, 3, FORWARD, head_tokens=2) == 27648 + 768 + 3200
    # LoRA training with 100 adapter weights: 4*4608*3 + 3*768 + 4*800*2 (frozen head) + 6*100*3
    assert sequence_flops(SMALL, 3, TRAIN_FROZEN, head_tokens=2, lora_params=100) == 55296 + 2304 + 6400 + 1800
    # adapters cost nothing in forward-only passes; the head can run in its own mode
    assert sequence_flops(SMALL, 3, FORWARD, lora_params=100) == 27648 + 768
    assert sequence_flops(SMALL, 3, TRAIN, head_tokens=1, head_mode=FORWARD) == 82944 + 2304 + 1600


def test_mfu_and_bandwidth_by_hand():
    assert mfu(989e12, 2.0, 989e12) == pytest.approx(0.5)
    assert mfu(989e12, 1.0, 989e12, n_devices=2) == pytest.approx(0.5)
    assert mfu(1.0, 1.0, None) is None
    # 3 decode steps after a 5-token prompt, batch 2: 3 x 100 weight bytes + 2 x 10 x (6 + 7 + 8) cache bytes
    assert decode_bytes(100, 10, batch=2, prompt_len=5, steps=3) == 300 + 420
    assert bandwidth_utilisation(1.675e12, 1.0, 3.35e12) == pytest.approx(0.5)
    assert bandwidth_utilisation(1.0, 1.0, None) is None


@pytest.mark.parametrize("name, flops, bandwidth", [
    ("NVIDIA H100 80GB HBM3", 989e12, 3.35e12),
    ("NVIDIA H100 PCIe", 756e12, 2.0e12),
    ("NVIDIA H100 NVL", 835e12, 3.9e12),
    ("NVIDIA H200", 989e12, 4.8e12),
])
def test_device_peaks_match_device_names(name, flops, bandwidth):
    peak = device_peak(name)
    assert (peak.bf16_flops, peak.hbm_bytes_per_s) == (flops, bandwidth)


def test_unknown_device_has_no_peak_and_says_so():
    peak = device_peak("Tesla T4")
    assert peak.bf16_flops is None and peak.hbm_bytes_per_s is None
    assert "Tesla T4" in peak.note and "null" in peak.note


# -------------------------------------------------------------- the formulas against PyTorch's own FLOP counter
def _tiny_qwen2(tie: bool):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                         attn_implementation="eager")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config), config


def _counted_flops(model, ids, backward: bool) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        logits = model(ids).logits
        if backward:
            logits.float().sum().backward()
    return counter.get_total_flops()


def test_forward_and_training_flops_match_torch_flop_counter():
    """Eager attention computes the full S x S score matrix, so the counter sees the full square; everything else
    (projections, MLP, head, and the 3x / 2x backward factors) must match our formulas exactly."""
    model, config = _tiny_qwen2(tie=False)
    shape = ModelShape.from_config(config)
    assert shape == SMALL
    s = 7
    ids = torch.randint(0, 50, (1, s))
    full_square_attention = 4 * shape.n_layers * shape.attn_dim * s * s

    forward = 2 * (shape.body_params + shape.head_params) * s + full_square_attention
    assert _counted_flops(model, ids, backward=False) == forward

    # Full training: every matmul 3x its forward (weight and input gradients), attention 3x.
    assert _counted_flops(model, ids, backward=True) == 3 * forward

    # Frozen weights with gradients flowing through (as under LoRA): input gradients only -> 2x forward in total
    # for the weights, attention still 3x.
    model.zero_grad()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "model.embed_tokens.weight")
    frozen = 4 * (shape.body_params + shape.head_params) * s + 3 * full_square_attention
    assert _counted_flops(model, ids, backward=True) == frozen


# ------------------------------------------------------------------------------------------ benchmark plumbing
def test_numeric_tokenizer_round_trips_ids_through_text():
    from benchmarks.gpu_bench import EOS, numeric_tokenizer

    tok = numeric_tokenizer(1000)
    assert len(tok) == 1000 and tok.eos_token_id == 998 and tok.pad_token_id == 999
    # TRL concatenates prompt + completion + EOS as text: the ids must come back exactly
    assert tok("5 17 900 " + "3 42" + EOS, add_special_tokens=False)["input_ids"] == [5, 17, 900, 3, 42, 998]


def test_tiny_benchmark_runs_every_dpo_variant_and_generation_on_cpu(tmp_path):
    from benchmarks.gpu_bench import BenchSettings, run_benchmark

    settings = BenchSettings.tiny(workdir=str(tmp_path / "work"),
                                  variants=["A", "B_memory", "B_precompute", "B_liger", "B_static"])
    out = tmp_path / "gpu_bench_tiny.json"
    report = run_benchmark(settings, ["dpo_lora", "generation"], out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["versions"]["trl"] and report["versions"]["torch"]
    assert report["peak"]["bf16_flops"] is None and "null" in report["peak"]["note"]

    dpo = report["cases"]["dpo_lora"]
    pair_tokens = 2 * settings.seq_len  # chosen and rejected sequences, no padding at fixed lengths
    for variant in ("A", "B_memory", "B_precompute"):
        result = dpo[variant]
        assert "error" not in result, result
        assert result["tokens_per_step"] == settings.batch_size * settings.grad_accum * pair_tokens
        assert result["tokens_per_s"] > 0 and result["step_time_s"] > 0 and result["model_tflops_per_s"] > 0
        assert result["mfu"] is None  # no peak figures for a CPU
    # A is what plain TRL does (checkpointing on, fp32 weights); B is our stage as it ships; B_* add one change each
    assert dpo["A"]["model_checkpointing"] is True and dpo["A"]["weights_dtype"] == "torch.float32"
    assert dpo["B_memory"]["source"].startswith("rlhf_lm.stages.dpo.CONFIG +dtype=bfloat16")
    assert dpo["B_memory"]["model_checkpointing"] is True and dpo["B_memory"]["weights_dtype"] == "torch.bfloat16"
    assert dpo["B_precompute"]["model_checkpointing"] is False
    assert "B" not in dpo and "B_bf16" not in dpo  # not selected
    if importlib.util.find_spec("liger_kernel") is None:
        assert "liger-kernel is not installed" in dpo["B_liger"]["skipped"]
    assert dpo["B_precompute"]["precompute_s"] > 0
    assert dpo["B_precompute"]["tokens_per_s_incl_precompute_3ep"] > dpo["B_precompute"][
        "tokens_per_s_incl_precompute_1ep"]
    # Without the reference forward a step costs fewer model FLOPs per token
    assert (dpo["B_precompute"]["model_tflops_per_s"] / dpo["B_precompute"]["tokens_per_s"]
            < dpo["B_memory"]["model_tflops_per_s"] / dpo["B_memory"]["tokens_per_s"])
    assert {"B_memory", "B_precompute"} <= set(dpo["ratios_vs_A"])

    gen = report["cases"]["generation"]
    assert gen["A_bs2"]["cache"] == "dynamic" and gen["B_static_bs2"]["cache"] == "static"
    assert gen["B_static_bs2"]["decode_tokens_per_s"] > 0 and gen["A_bs2"]["mbu"] is None
    assert "B_static_bs2" in gen["ratios_vs_A"]
    assert report["targets"] == []  # targets are stated for 1.5B only

    assert report["case_settings"]["dpo_lora"]["measure_steps"] == settings.measure_steps
    # A later invocation (here measuring nothing) merges into the same file instead of overwriting it
    assert run_benchmark(settings, [], out)["cases"] == report["cases"]
    # One that re-measures a variant replaces that variant only, and the ratios follow it
    again = run_benchmark(replace(settings, variants=["B_memory"], measure_steps=3), ["dpo_lora"], out)["cases"]
    assert set(again["dpo_lora"]) == set(dpo) and again["dpo_lora"]["A"] == dpo["A"]
    assert again["dpo_lora"]["B_memory"]["steps_measured"] == 3
    assert again["dpo_lora"]["ratios_vs_A"]["B_memory"]["tokens_per_s"] == (
        again["dpo_lora"]["B_memory"]["tokens_per_s"] / dpo["A"]["tokens_per_s"])


@pytest.mark.slow
def test_tiny_benchmark_runs_every_case_on_cpu(tmp_path):
    from benchmarks.gpu_bench import ALL_CASES, BenchSettings, run_benchmark

    report = run_benchmark(BenchSettings.tiny(workdir=str(tmp_path / "work")), ALL_CASES, tmp_path / "all.json")
    for case in ALL_CASES:
        for variant, result in report["cases"][case].items():
            if variant != "ratios_vs_A":
                assert "error" not in result, (case, variant, result)
                assert "skipped" not in result or variant == "B_liger", (case, variant, result)
    assert report["cases"]["grpo_lora"]["B"]["rollout_s_per_step"] > 0
    if "skipped" not in report["cases"]["ppo_lora"]["B"]:
        assert report["cases"]["ppo_lora"]["B"]["update_s_per_step"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_size_benchmark_on_gpu(tmp_path):
    """The issue's measurement: 1.5B, bf16, 512 + 512 tokens, every case (tens of minutes on one H100)."""
    from benchmarks.gpu_bench import ALL_CASES, RESULTS_DIR, BenchSettings, run_benchmark

    report = run_benchmark(BenchSettings(size="1.5b", workdir=str(tmp_path / "work")), ALL_CASES,
                           RESULTS_DIR / "gpu_bench_1.5b.json")
    for case in ("dpo_lora", "dpo_full", "reward_lora", "grpo_lora"):
        for variant in ("A", "B"):
            result = report["cases"][case][variant]
            assert "error" not in result, (case, variant, result)
            assert result["peak_allocated_gib"] > 0
            if result["mfu"] is not None:  # a known device
                assert 0 < result["mfu"] < 1


def test_merge_joins_cases_of_one_device_and_refuses_two():
    from benchmarks.gpu_bench import merge_reports

    base = {"device": "NVIDIA H100 80GB HBM3", "settings": {"size": "1.5b"}, "targets": []}
    a = dict(base, cases={"dpo_lora": {"A": {"tokens_per_s": 1.0}, "B": {"tokens_per_s": 2.5, "mfu": 0.3}}})
    b = dict(base, cases={"reward_lora": {"B": {"mfu": 0.5}}})
    merged = merge_reports([a, b])
    assert set(merged["cases"]) == {"dpo_lora", "reward_lora"}
    status = {t["target"]: (t["measured"], t["status"]) for t in merged["targets"]}
    assert status["DPO-LoRA tokens/s >= 2x plain TRL"] == (2.5, "met")
    assert status["DPO-LoRA MFU >= 0.40"] == (0.3, "missed")
    assert status["reward-model LoRA MFU >= 0.40"] == (0.5, "met")
    assert status["DPO full MFU >= 0.45"][1] == "not measured"
    with pytest.raises(SystemExit, match="different devices"):
        merge_reports([a, dict(b, device="NVIDIA H200")])
