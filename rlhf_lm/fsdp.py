"""FSDP2 that really shards, on CPU ranks too, and the few things a sharded run must do differently.

Why accelerate alone is not enough on CPU (accelerate 1.15, verified): a launch with ``distributed_type: FSDP`` and
``use_cpu: true`` starts the ranks with ``ACCELERATE_USE_FSDP=true``, but ``AcceleratorState`` turns that request
into ``DistributedType.FSDP`` only when the process group is a GPU-family one (``state.py``, the branch on
``DistributedType.MULTI_GPU, MULTI_XPU, ...``). CPU ranks form a ``MULTI_CPU`` (gloo) group, so the FSDP plugin is
dropped and ``prepare`` wraps the model in plain DDP: every rank keeps a full copy. Nothing in torch needs a GPU for
FSDP2 (``fully_shard`` all-gathers and reduce-scatters over gloo), so :func:`make_fsdp_real` switches the state to
FSDP with the launch's plugin once the ranks have joined their gloo group; from there on accelerate, transformers'
Trainer and TRL take exactly the code paths a GPU run takes (``fsdp2_prepare_model``, sharded / full state dicts,
``save_fsdp_model``). CI runs every stage that way, in 2 gloo processes.

What a sharded run must do differently, wherever the model is used outside the trainer's own step:

* every rank takes part in every forward, generation included (each decoding step all-gathers the weights). A rank
  whose samples all ended keeps stepping until the others are done: torch marks every module ``fully_shard``
  manages (``_is_fsdp_managed_module``) and transformers' ``generate`` turns ``synced_gpus`` on for such modules;
* auxiliary models (reward model, judge, reference) must hold real weights on every rank
  (:func:`full_weights_on_every_rank`): with ``fsdp_cpu_ram_efficient_loading`` transformers loads empty weights on
  all ranks but the first, which is only right for the model accelerate will shard and broadcast;
* the model is saved from a state dict gathered by all ranks, written by the main process (:func:`full_state_dict`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_TRUE = ("1", "true", "yes")


def _flag(name: str, environ: dict[str, str] | None = None) -> bool:
    return (environ if environ is not None else os.environ).get(name, "").lower() in _TRUE


def fsdp_requested(environ: dict[str, str] | None = None) -> bool:
    """The launch asked for FSDP (``accelerate launch`` with ``distributed_type: FSDP`` sets ACCELERATE_USE_FSDP)."""
    return _flag("ACCELERATE_USE_FSDP", environ)


def requested_fsdp_version(environ: dict[str, str] | None = None) -> int:
    """``fsdp_version`` of the launch's config (accelerate's default is 1)."""
    value = (environ if environ is not None else os.environ).get("FSDP_VERSION", "1")
    return int(value) if value.isdigit() else 1


def cpu_fsdp_launch(environ: dict[str, str] | None = None) -> bool:
    """FSDP asked for on CPU ranks of a multi-process launch: the case accelerate silently runs as DDP."""
    environ = dict(os.environ if environ is None else environ)
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    return fsdp_requested(environ) and world > 1 and _flag("ACCELERATE_USE_CPU", environ)


def make_fsdp_real(accelerator, plugin_args: dict | None = None) -> bool:
    """Switch ``accelerator``'s (process-wide) state from MULTI_CPU to FSDP with the launch's FSDP plugin, when the
    launch asked for FSDP on CPU ranks. Returns whether the state is FSDP now. A no-op on GPUs, where accelerate
    does this itself, and for single-process runs."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return True
    if state.distributed_type != DistributedType.MULTI_CPU or not cpu_fsdp_launch():
        return False
    plugin = FullyShardedDataParallelPlugin(**(plugin_args or {}))  # reads the launch's FSDP_* variables
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # AcceleratorState and PartialState keep their fields in two process-wide dicts; accelerate itself writes
    # distributed_type into both when it picks FSDP on GPUs.
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


class ShardedOnCPU:
    """Trainer mixin: the accelerator a transformers/TRL Trainer creates runs FSDP on CPU ranks when the launch asked
    for it (see :func:`make_fsdp_real`). The Trainer reads ``is_fsdp_enabled`` from then on: it prepares the model
    with FSDP2 and saves sharded or full checkpoints as on GPUs."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if make_fsdp_real(self.accelerator, self.args.fsdp_plugin_args):
            self.is_fsdp_enabled = True


@contextlib.contextmanager
def full_weights_on_every_rank() -> Iterator[None]:
    """Load a model with its real weights on every rank, even when the launch set ``fsdp_cpu_ram_efficient_loading``.

    That option makes transformers load empty (meta) weights on all local ranks but the first and relies on
    accelerate's FSDP preparation to broadcast them - true only for the model the trainer shards. A reward model,
    judge or reference loaded the same way would score with garbage on every other rank.
    """
    saved = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
        else:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor shard (FSDP2), i.e. using it is a collective operation."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def unsharded(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a plain tensor: a DTensor (e.g. the gradient norm FSDP2's clipping returns) is gathered first."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of ``model``, on CPU in the main process and empty in the others.

    Collective: every rank must call it. ``save_pretrained`` on the main process alone would read its own shards -
    or hang waiting for the others - and transformers' Trainer saves no weights at all in ``save_model`` when the
    launch's ``fsdp_state_dict_type`` is SHARDED_STATE_DICT (only its checkpoints get the sharded files).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (embeddings = LM head) come back as separate copies; share them again, so save_pretrained
    # recognises the tie and writes the file a one-process run writes.
    first_name: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        first = first_name.setdefault(id(tensor), name)
        if first != name and first in state and name in state:
            state[name] = state[first]
    return state


def state_bytes_per_rank(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, float]:
    """Bytes of parameters and of optimizer state held by one rank - a DTensor counts its local shard only - as the
    largest over ranks (collective when a process group is up). What FSDP saves per rank, measured from the tensors
    themselves rather than from allocator statistics, which CPU runs do not have."""
    import torch.distributed as dist
    from accelerate import PartialState
    from torch.distributed.tensor import DTensor

    def local_bytes(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return local.numel() * local.element_size()

    params = sum(local_bytes(p) for p in model.parameters())
    states = [v for s in (optimizer.state.values() if optimizer is not None else []) for v in s.values()]
    optim = sum(local_bytes(v) for v in states if isinstance(v, torch.Tensor) and v.dim() > 0)  # not Adam's step
    sizes = torch.tensor([float(params), float(optim)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        sizes = sizes.to(PartialState().device)  # NCCL reduces GPU tensors only
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    return {"memory/param_bytes_per_rank": sizes[0].item(), "memory/optimizer_bytes_per_rank": sizes[1].item()}
