"""PPO under FSDP2: how the policy + value head is sharded, and how its checkpoints hold sharded or full state.

Our PPO loop prepares its model itself instead of through ``accelerator.prepare``, because accelerate's FSDP2
preparation makes the module it is given the root and wraps the rest around it: here that module is
:class:`~rlhf_lm.ppo.model.PolicyWithValueHead`, but rollouts call ``generate`` on the transformers model inside it.
A forward that skips the root leaves the root's parameters (embeddings, LM head) sharded, and FSDP2 refuses a root
whose children ran first. So the units are laid out around the calls the loop really makes:

* each decoder layer is a unit (its LoRA matrices with it);
* the transformers causal LM is a root: embeddings, final norm and the (tied) LM head are gathered by its own forward,
  which every call reaches - training, rollout ``generate`` and the adapter-off reference forward alike;
* the value head is a root of its own: it is a separate call on the trunk's hidden states.

Every parameter is then a DTensor shard, so AdamW, gradient clipping and the state dicts below treat them alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_lm.errors import ArtifactError, ConfigError
from rlhf_lm.ppo.model import PolicyWithValueHead

SHARDED_DIR = "sharded_state"  # DCP folder of a SHARDED_STATE_DICT checkpoint: one file per rank
FULL_STATE = "full_state.pt"  # trainable weights + optimizer, gathered (FULL_STATE_DICT checkpoints)


def shard_policy_and_value_head(model: PolicyWithValueHead, plugin) -> None:
    """``fully_shard`` ``model`` in place, as laid out in the module docstring, with the launch's FSDP settings
    (``plugin``: accelerate's FullyShardedDataParallelPlugin)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    lm = model.policy.get_base_model() if hasattr(model.policy, "get_base_model") else model.policy
    layer_names = set(getattr(lm, "_no_split_modules", None) or [])
    if plugin.transformer_cls_names_to_wrap:
        layer_names = set(plugin.transformer_cls_names_to_wrap)
    layers = [m for m in lm.modules() if type(m).__name__ in layer_names]
    if not layers:
        raise ConfigError(f"Cannot find the decoder layers of {type(lm).__name__} to shard (looked for "
                          f"{sorted(layer_names) or 'its _no_split_modules'}); set fsdp_transformer_layer_cls_to_wrap "
                          "in the accelerate config.")
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}
    if plugin.cpu_offload is not None:
        kwargs["offload_policy"] = plugin.cpu_offload
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(lm, **kwargs)
    fully_shard(model.value_head, **kwargs)


def _options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Only what trains: the frozen base is the starting checkpoint, not resume state (so a load is not strict; the
    # trainable keys are checked by load_sharded_state instead).
    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=True, strict=False)


def save_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path, full: bool,
                       is_main: bool) -> None:
    """Trainable weights and optimizer state into ``ckpt``: each rank's shards (torch.distributed.checkpoint) or,
    with ``full``, one gathered file written by the main process. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options(full))
    if full:
        if is_main:
            torch.save({"model": model_state, "optimizer": optim_state}, ckpt / FULL_STATE)
    else:
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(ckpt / SHARDED_DIR))


def has_sharded_state(ckpt: Path) -> bool:
    return (ckpt / SHARDED_DIR).is_dir() or (ckpt / FULL_STATE).is_file()


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    """Restore what :func:`save_sharded_state` wrote, in either form, into the sharded ``model`` and ``optimizer``
    (a full checkpoint is read by every rank and sharded on load). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    full = (ckpt / FULL_STATE).is_file()
    if full:
        saved = torch.load(ckpt / FULL_STATE, weights_only=False)
        model_state, optim_state = saved["model"], saved["optimizer"]
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=_options(False))
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(ckpt / SHARDED_DIR))
        model_state, optim_state = state["model"], state["optimizer"]
    result = set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                            options=_options(full))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if missing := sorted(trainable & set(result.missing_keys)):
        raise ArtifactError(f"Checkpoint {ckpt} lacks trained weights ({', '.join(missing[:3])}, ...); it was written "
                            "for another model or adapter configuration.")
