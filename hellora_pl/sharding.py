"""FSDP2 sharding of the backbone for Lightning's ModelParallelStrategy, and adapter tensors across shards.

Why FSDP2 (`fully_shard`) and not Lightning's FSDPStrategy (FSDP1): FSDP1 flattens each wrapped
unit into one FlatParameter, which needs one dtype per unit and `use_orig_params=True` to mix
frozen base weights with trainable adapters, and Lightning refuses it on CPU. FSDP2 shards every
parameter on its own (a DTensor), so frozen and trainable tensors of any dtype share a layer, and
it runs on CPU with gloo. Buffers are never sharded, so the NF4 codes of a 4-bit base (buffers of
NF4Weight) stay whole on every rank; only the 16-bit parameters (embeddings, norms, LM head,
adapters) are split.

The callbacks profile and inject on the whole model in their `setup`; `configure_model` runs after
that, so every rank shards a model that already holds the same adapters. Rank 0 writes the
gathered adapters with `adapters.io.write_adapter`, the writer of unsharded runs too.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbones import architecture_for


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter is a DTensor (the model went through fully_shard)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_backbone(model: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each decoder layer, then the rest (embeddings, final norm, LM head) as the root unit.

    Parameters with no elements (NF4 routers keep an empty placeholder weight) are left out of sharding.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model  # configure_model runs again for a second stage (fit, then test)
    ignored = {p for p in model.parameters() if p.numel() == 0} or None
    for layer in architecture_for(model).decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    return model


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of (possibly sharded) tensors; a collective, so every rank must call it."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in tensors.items():
        t = t.detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()
        out[name] = t.cpu().clone()
    return out


def shard_like(tensors: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors cut the way the matching targets are sharded (each rank keeps its own slice, no traffic)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for name, t in tensors.items():
        target = targets.get(name)
        if isinstance(target, DTensor):
            t = distribute_tensor(
                t.to(target.device, target.dtype), target.device_mesh, target.placements, src_data_rank=None
            )
        out[name] = t
    return out
