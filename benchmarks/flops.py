"""FLOP and byte accounting for the GPU benchmarks: model FLOPs utilisation (MFU) and memory-bandwidth utilisation.

Pure functions on plain numbers, so the formulas can be checked by hand (tests/test_gpu_bench.py does).

Conventions (the ones of the PaLM paper's MFU, Chowdhery et al. 2022, appendix B):

* One multiply-add is 2 FLOPs. A token passing forward through a weight matrix of P parameters costs 2P FLOPs.
* Backward through a matrix costs 4P: 2P for the gradient with respect to its input (needed to reach earlier layers)
  and 2P for the gradient with respect to its weights. So a fully trained token costs **6N** FLOPs and a
  forward-only token (reference model, reward model scoring, generation) **2N**.
* A **frozen** matrix under LoRA still passes gradients to its input but computes no weight gradient: forward 2N +
  backward 2N = **4N** per token. The LoRA adapters themselves are trained normally (6 x their parameters).
* Attention scores and the weighted sum of values have no weights. Per layer and per query at context length c they
  cost 2·c·d_attn (QK^T) + 2·c·d_attn (AV) = 4·c·d_attn forward, and twice that backward. We count **causal**
  attention (query i attends to i+1 keys), the work a causal kernel such as FlashAttention/SDPA actually does; the
  PaLM formula counts the full square, which would inflate MFU by up to 2x on the attention term.
* The LM head (vocab x d) is counted only for the positions whose logits are computed. TRL's fused LM head scores only
  completion tokens, so for DPO/GRPO the head costs 2·V·d per completion token, not per sequence token.
* Embedding lookups, norms, activations, softmax, rotary embeddings, biases and the optimizer step are not counted
  (each is below 1% of the FLOPs at 0.5B+ and none is a matmul).
* Recomputation from gradient checkpointing is *not* counted: MFU counts the model's FLOPs, not the hardware's, so a
  run that recomputes activations gets no credit for it (that is the point of MFU over HFU).
* Generation is memory-bound: each decoding step must read every weight once and the whole KV cache of the batch.
  Memory-bandwidth utilisation (MBU) = those bytes / step time / peak HBM bandwidth, a lower bound on real traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

# Peak dense bf16 tensor-core FLOP/s (no 2:4 sparsity) and HBM bandwidth in bytes/s, from NVIDIA's data sheets.
# Matched against torch.cuda.get_device_name() in order, so the more specific names come first.
DEVICE_PEAKS: list[tuple[str, float, float]] = [
    ("H200 NVL", 835e12, 4.8e12),
    ("H200", 989e12, 4.8e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),  # SXM5, reported as "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100-SXM4-40GB", 312e12, 1.555e12),
    ("A100 80GB PCIe", 312e12, 1.935e12),
]


@dataclass(frozen=True)
class DevicePeak:
    name: str
    bf16_flops: float | None  # FLOP/s
    hbm_bytes_per_s: float | None
    note: str = ""


def device_peak(device_name: str) -> DevicePeak:
    """Peak bf16 FLOP/s and memory bandwidth for a CUDA device name; unknown devices get None and a note."""
    for key, flops, bandwidth in DEVICE_PEAKS:
        if key.lower() in device_name.lower():
            return DevicePeak(device_name, flops, bandwidth, f"matched '{key}'")
    return DevicePeak(device_name, None, None, f"no peak figures for '{device_name}': MFU and MBU are reported as null")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that its FLOPs depend on."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    gated_mlp: bool = True  # SwiGLU: gate, up and down projections

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers config of the Llama/Qwen2 family."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            n_layers=config.num_hidden_layers,
            d_model=config.hidden_size,
            n_heads=config.num_attention_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            d_ff=config.intermediate_size,
            vocab_size=config.vocab_size,
        )

    @property
    def attn_dim(self) -> int:
        """Width of the query/output projections (n_heads x head_dim)."""
        return self.n_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Matmul weights of one block: q and o (d x attn_dim), k and v (d x kv_dim), the MLP (2 or 3 x d x d_ff)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = 2 * self.d_model * self.attn_dim + 2 * self.d_model * kv_dim
        mlp = (3 if self.gated_mlp else 2) * self.d_model * self.d_ff
        return attention + mlp

    @property
    def body_params(self) -> int:
        """Matmul weights of all blocks (no embeddings, norms or head): the N of "6N"."""
        return self.n_layers * self.layer_params

    @property
    def head_params(self) -> int:
        """The LM head (vocab x d); tied or not, the projection costs the same."""
        return self.vocab_size * self.d_model

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """KV-cache bytes one token occupies (keys and values, every layer)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_element


# Per-token FLOPs per weight for each way a token passes through a matrix.
FORWARD, TRAIN_FROZEN, TRAIN = "forward", "train_frozen", "train"
_WEIGHT_FACTOR = {FORWARD: 2, TRAIN_FROZEN: 4, TRAIN: 6}
_ATTENTION_FACTOR = {FORWARD: 1, TRAIN_FROZEN: 3, TRAIN: 3}  # attention has no weights: backward = 2x forward always


def matmul_flops(params: int, tokens: int, mode: str) -> int:
    """FLOPs of ``tokens`` tokens through ``params`` weights: 2x forward-only, 4x frozen under LoRA, 6x trained."""
    return _WEIGHT_FACTOR[mode] * params * tokens


def causal_attention_flops(shape: ModelShape, seq_len: int, mode: str) -> int:
    """Score and value FLOPs of one causal sequence: sum over queries i=1..S of 4·i·d_attn per layer, x3 if trained."""
    forward = 4 * shape.n_layers * shape.attn_dim * seq_len * (seq_len + 1) // 2
    return _ATTENTION_FACTOR[mode] * forward


def sequence_flops(
    shape: ModelShape, seq_len: int, mode: str, head_tokens: int = 0, lora_params: int = 0, head_mode: str | None = None
) -> int:
    """Model FLOPs of one sequence of ``seq_len`` non-pad tokens.

    ``mode`` is how the body is run (FORWARD, TRAIN_FROZEN for a LoRA-wrapped base, TRAIN for full fine-tuning);
    ``head_tokens`` how many positions go through the LM head (0 for a reward model's scalar head), in ``head_mode``
    (defaults to ``mode``); ``lora_params`` the trained adapter weights, which are only present when training.
    """
    flops = matmul_flops(shape.body_params, seq_len, mode) + causal_attention_flops(shape, seq_len, mode)
    flops += matmul_flops(shape.head_params, head_tokens, head_mode or mode)
    if lora_params and mode != FORWARD:
        flops += matmul_flops(lora_params, seq_len, TRAIN)
    return flops


def mfu(model_flops: float, seconds: float, peak_flops: float | None, n_devices: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices; None without a known peak."""
    if not peak_flops or seconds <= 0:
        return None
    return model_flops / seconds / (peak_flops * n_devices)


def decode_bytes(weight_bytes: int, kv_bytes_per_token: int, batch: int, prompt_len: int, steps: int) -> int:
    """Minimum HBM bytes read by ``steps`` decoding steps after a prefill of ``prompt_len`` tokens.

    Step i (1..steps) reads every weight once (shared by the batch) and the cache of prompt_len + i positions per
    sequence: sum = steps·W + batch·kv·(steps·prompt_len + steps·(steps+1)/2).
    """
    cached_positions = steps * prompt_len + steps * (steps + 1) // 2
    return steps * weight_bytes + batch * kv_bytes_per_token * cached_positions


def bandwidth_utilisation(bytes_moved: float, seconds: float, peak_bytes_per_s: float | None) -> float | None:
    """Achieved bytes/s over the peak HBM bandwidth; None without a known peak."""
    if not peak_bytes_per_s or seconds <= 0:
        return None
    return bytes_moved / seconds / peak_bytes_per_s
