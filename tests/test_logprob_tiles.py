"""Small log-prob tiles on CPU (rlhf_lm.logprob_tiles): same numbers as TRL's default tiles, restored afterwards."""

import torch
from trl.kernels import chunked_logprob
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

from rlhf_lm.logprob_tiles import FALLBACK_TOKEN_TILE, FallbackLogProbTiles, fallback_logprob_tiles

OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


def head_and_grads(hidden, weight, targets):
    hidden = hidden.clone().requires_grad_(True)
    out = chunked_logprob.ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, OUTPUTS)
    (out[0].sum() + 0.5 * out[1].sum()).backward()  # log-probs and entropy both get a gradient, as in DPO/GRPO
    return out[0].detach(), out[1].detach(), hidden.grad


def test_small_tiles_give_the_same_log_probs_entropy_and_gradients():
    torch.manual_seed(0)
    # more tokens than one small tile, a vocabulary wider than TRL's 32,768-entry vocabulary chunk
    hidden, weight = torch.randn(600, 16), torch.randn(40_000, 16) * 0.3
    targets = torch.randint(0, 40_000, (600,))
    default = head_and_grads(hidden, weight, targets)
    with fallback_logprob_tiles(torch.device("cpu")):
        assert chunked_logprob.TOKEN_CHUNK_SIZE == FALLBACK_TOKEN_TILE
        small = head_and_grads(hidden, weight, targets)
    for a, b in zip(default, small, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_tile_is_put_back_after_a_step_even_one_that_fails():
    before = chunked_logprob.TOKEN_CHUNK_SIZE

    class Base:
        def training_step(self, *args, **kwargs):
            self.seen = chunked_logprob.TOKEN_CHUNK_SIZE
            raise RuntimeError("step failed")

    class Trainer(FallbackLogProbTiles, Base):
        accelerator = type("Accelerator", (), {"device": torch.device("cpu")})()

    trainer = Trainer()
    try:
        trainer.training_step()
    except RuntimeError:
        pass
    assert trainer.seen == FALLBACK_TOKEN_TILE
    assert chunked_logprob.TOKEN_CHUNK_SIZE == before


def test_stage_trainers_use_small_tiles():
    from rlhf_lm.trainers import DPOTrainer, with_atomic_checkpoints

    assert issubclass(DPOTrainer, FallbackLogProbTiles)
    import trl

    assert issubclass(with_atomic_checkpoints(trl.GRPOTrainer), FallbackLogProbTiles)
