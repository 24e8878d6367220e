"""Smaller log-prob tiles for TRL's fused LM head where it has no Triton kernel (CPU).

TRL 1.16's DPO, GRPO and RLOO trainers score tokens through ``trl.kernels.chunked_logprob``, which projects
hidden states onto the vocabulary in tiles of ``TOKEN_CHUNK_SIZE`` (4,096) tokens by 32,768 vocabulary entries.
On CUDA a Triton kernel folds each tile in place. Elsewhere its torch fallback keeps about eight float32
temporaries the size of a whole tile alive at once (logits, exp, log-probs, the one-hot target, the gradient...).

Measured on SmolLM2-135M (49k vocabulary), 16 sequences x 191 tokens, forward + backward of the head alone, on
this project's 2-core CPU: 4,096-token tiles peak 2.9 GB above the inputs, 512-token tiles 0.5 GB, 256-token
tiles 0.1-0.2 GB, at the same speed or faster (smaller tiles stay in cache). That 2.9 GB was most of the 4.8 GB
peak RSS of a whole LoRA DPO step. TRL exposes no setting for the tile, so this sets its module constant for the
length of one training or evaluation step and puts it back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# Tokens per tile where the torch fallback runs. Below ~256 the per-tile Python overhead starts to show.
FALLBACK_TOKEN_TILE = 256


@contextmanager
def fallback_logprob_tiles(device: torch.device, tokens: int = FALLBACK_TOKEN_TILE):
    """TRL's fused LM head in ``tokens``-token tiles on ``device`` when it runs there without Triton."""
    try:
        from trl.kernels import chunked_logprob
    except ImportError:  # a TRL without the fused head materialises the logits anyway: nothing to tune
        yield
        return
    use_triton = getattr(chunked_logprob, "_use_triton", None)
    if not hasattr(chunked_logprob, "TOKEN_CHUNK_SIZE") or use_triton is None or use_triton(device):
        yield
        return
    previous = chunked_logprob.TOKEN_CHUNK_SIZE
    chunked_logprob.TOKEN_CHUNK_SIZE = min(previous, tokens)
    try:
        yield
    finally:
        chunked_logprob.TOKEN_CHUNK_SIZE = previous


class FallbackLogProbTiles:
    """Trainer mixin: every training step (forward and backward) and evaluation step of a TRL trainer runs with
    :func:`fallback_logprob_tiles`."""

    def training_step(self, *args, **kwargs):
        with fallback_logprob_tiles(self.accelerator.device):
            return super().training_step(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        with fallback_logprob_tiles(self.accelerator.device):
            return super().prediction_step(*args, **kwargs)
