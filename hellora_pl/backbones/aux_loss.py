"""The router's load-balancing auxiliary loss, switched on with a coefficient where a model has one."""

from __future__ import annotations

from torch import nn

from .registry import architecture_for


def set_load_balancing_loss(model: nn.Module, coefficient: float) -> None:
    """Add the model's own load-balancing loss, times `coefficient`, to its training loss.

    transformers MoE models add it to `loss` when `output_router_logits` is on (the causal-LM
    head copies the coefficient at init, so it is set there too); DeepSeekMoE's gates read
    `aux_loss_alpha` (copied to each gate's `alpha`). Models without one are refused.
    """
    arch = architecture_for(model)
    if coefficient < 0:
        raise ValueError(f"router_aux_loss_coef must be >= 0, got {coefficient}.")
    if arch.aux_loss_field is None:
        raise ValueError(
            f"{arch.name} models have no load-balancing auxiliary loss in transformers; remove router_aux_loss_coef."
        )
    setattr(model.config, arch.aux_loss_field, coefficient)
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = coefficient > 0
    if hasattr(model, arch.aux_loss_field):
        setattr(model, arch.aux_loss_field, coefficient)
    for moe in arch.moe_layers(model):
        if hasattr(moe.router, "alpha"):
            moe.router.alpha = coefficient
