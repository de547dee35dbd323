"""Describe an MoE model from the model itself, for families whose experts use transformers' experts interface.

transformers 5 marks fused experts with `@use_experts_implementation`, which sets layout flags
on each experts instance (has_gate, has_bias, has_post_expert_norm, is_transposed,
is_concatenated). `detect_architecture(model)` finds those modules and reads the rest of an
`MoEArchitecture` off the module tree: the decoder layers, the MoE block (the experts' parent),
the router (the block's child with an [E, H] weight), shared experts (a child MLP), attention
(`self_attn`'s nn.Linear projections) and the config fields of E and top-k. Routing is read at
the experts' input ("experts_input"), so the counts are the experts the model ran, whatever
its router does.

Only the plain layout is detected: concatenated gated [E, 2I, H] gate_up and [E, H, I] down, no
bias, no post-expert norm, every decoder layer with `self_attn`, the MoE block a child of the
layer with no dense MLP beside it. Anything else is refused by name (`DetectionRefused`) with the
reason and the fix, never run with a path that would compute something else.
"""

from __future__ import annotations

from torch import nn

from .architecture import MoEArchitecture, _get

LAYOUT_FLAGS = ("has_gate", "has_bias", "has_post_expert_norm", "is_transposed", "is_concatenated")
DETECTED = "detected"

LAYER_PATHS = ("model.layers",)
NUM_EXPERTS_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k_experts", "moe_k", "top_k")
AUX_LOSS_FIELD = "router_aux_loss_coef"
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION = "self_attn"

# Flag value that is refused -> why, in words.
_LAYOUT_REFUSALS = {
    ("is_transposed", True): "transposed expert weights ([E, in, out])",
    ("has_bias", True): "expert biases",
    ("has_post_expert_norm", True): "a norm after each expert",
    ("is_concatenated", False): "interleaved gate/up rows (gate0, up0, gate1, ...)",
    ("has_gate", False): "ungated experts (up and down only)",
}

_FIX = (
    "Describe the family with hellora_pl.backbones.MoEArchitecture(...) and register_architecture "
    "(see 'Adding an architecture or expert layout' in ARCHITECTURE.md) if its layout is one hellora_pl "
    "runs, or wait for support of this layout."
)


class DetectionRefused(ValueError):
    """The model has experts-interface modules, but a layout or structure detection does not handle.

    `reason` says what was found, without the fix (the registry's message adds it)."""

    def __init__(self, model_type, reason: str):
        self.model_type = model_type
        self.reason = reason
        super().__init__(f"{model_type!r} cannot be detected: {reason}. {_FIX}")


def is_experts_interface(module: nn.Module) -> bool:
    """An instance of a class decorated with transformers' `use_experts_implementation`."""
    return all(hasattr(module, flag) for flag in LAYOUT_FLAGS) and hasattr(type(module), "_apply_gate")


def layout_refusals(experts: nn.Module) -> list[str]:
    """What about this experts module's layout the adapted expert path does not run ([] for the plain layout)."""
    return [why for (flag, value), why in _LAYOUT_REFUSALS.items() if bool(getattr(experts, flag)) == value]


def detect_architecture(model: nn.Module) -> MoEArchitecture | None:
    """An MoEArchitecture read from `model`, None when it has no experts-interface modules.

    Raises DetectionRefused (naming the reason) for a model that has them in a layout or structure
    hellora_pl does not handle.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    experts_modules = [m for m in model.modules() if is_experts_interface(m)]
    if not experts_modules:
        return None

    def refuse(reason: str):
        raise DetectionRefused(model_type, reason)

    layouts = sorted({why for experts in experts_modules for why in layout_refusals(experts)})
    if layouts:
        refuse(
            f"its experts ({type(experts_modules[0]).__name__}) have {', '.join(layouts)}, which the adapted expert path does not run"
        )
    layers_path, layers = _decoder_layers(model)
    if layers is None:
        refuse(
            "its decoder layers are not at model.layers (a multimodal or wrapped model); "
            "detection handles decoder-only causal LMs for now"
        )
    without_attention = sorted(
        {name for layer in layers if not hasattr(layer, ATTENTION) for name, _ in layer.named_children()}
    )
    if without_attention:
        refuse(
            f"some decoder layers have no {ATTENTION} (hybrid mixers; children of those layers: "
            f"{', '.join(without_attention)}), which detection does not handle yet"
        )
    experts_paths = set()
    for layer in layers:
        experts_paths |= {name for name, module in layer.named_modules() if is_experts_interface(module)}
    if len(experts_paths) != 1:
        refuse(f"its decoder layers hold experts at different paths ({', '.join(sorted(experts_paths))})")
    (experts_path,) = experts_paths
    if "." not in experts_path:
        refuse(
            f"its experts ({experts_path!r}) are a direct child of the decoder layer: the MoE block is the layer "
            "itself, beside the layer's other parts"
        )
    block_path, experts_name = experts_path.rsplit(".", 1)
    moe_layers = [layer for layer in layers if _get(layer, experts_path, default=None) is not None]
    first_block = _get(moe_layers[0], block_path)
    experts = getattr(first_block, experts_name)
    num_experts = int(experts.gate_up_proj.shape[0])
    hidden = int(experts.gate_up_proj.shape[-1])
    router = _router_name(first_block, experts_name, num_experts, hidden)
    if router is None:
        refuse(
            f"its MoE block ({type(first_block).__name__}) has no child with an [{num_experts}, {hidden}] router weight"
        )
    if "." not in block_path:
        dense = [n for n, child in moe_layers[0].named_children() if n != block_path and _is_mlp(child)]
        if dense:
            refuse(f"its decoder layers have a dense MLP ({', '.join(dense)}) beside the MoE block ({block_path})")
    shared = [n for n, child in first_block.named_children() if n != router.split(".")[0] and _is_mlp(child)]
    if len(shared) > 1:
        refuse(f"its MoE block has several shared-expert MLPs ({', '.join(shared)})")
    num_experts_field = next((f for f in NUM_EXPERTS_FIELDS if getattr(config, f, None) == num_experts), None)
    top_k_field = next((f for f in TOP_K_FIELDS if isinstance(getattr(config, f, None), int)), None)
    if num_experts_field is None or top_k_field is None:
        missing = [
            what for what, field in (("number of experts", num_experts_field), ("top-k", top_k_field)) if field is None
        ]
        refuse(f"its config has no field of the {' and '.join(missing)} that detection knows")
    projections = _linear_children(getattr(layers[0], ATTENTION))
    differing = sorted(
        {
            type(getattr(layer, ATTENTION)).__name__
            for layer in layers
            if _linear_children(getattr(layer, ATTENTION)) != projections
        }
    )
    if differing:
        refuse(
            f"some decoder layers' {ATTENTION} ({', '.join(differing)}) lack the first layer's projections "
            f"({', '.join(projections)}): linear attention under {ATTENTION}, which detection does not handle yet"
        )
    return MoEArchitecture(
        name=str(model_type),
        model_types=(str(model_type),),
        layers=layers_path,
        attention=ATTENTION,
        attention_projections=projections,
        moe_block=block_path,
        router=router,
        experts=experts_name,
        shared_experts=shared[0] if shared else None,
        routing="experts_input",
        num_experts_field=num_experts_field,
        top_k_field=top_k_field,
        aux_loss_field=AUX_LOSS_FIELD if hasattr(config, AUX_LOSS_FIELD) else None,
        notes=DETECTED,
    )


def _linear_children(module: nn.Module) -> tuple[str, ...]:
    return tuple(name for name, child in module.named_children() if isinstance(child, nn.Linear))


def _decoder_layers(model: nn.Module) -> tuple[str, list[nn.Module] | None]:
    for path in LAYER_PATHS:
        layers = _get(model, path, default=None)
        if isinstance(layers, nn.ModuleList):
            return path, list(layers)
    return "", None


def _router_name(block: nn.Module, experts_name: str, num_experts: int, hidden: int) -> str | None:
    """The path of the block's module whose `weight` is [E, H] ("gate", or "router.gate" inside a router
    module); None when there is none or several."""
    found = [
        name
        for name, child in block.named_modules()
        if name
        and name.split(".")[0] != experts_name
        and tuple(getattr(getattr(child, "weight", None), "shape", ())) == (num_experts, hidden)
    ]
    return found[0] if len(found) == 1 else None


def _is_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in MLP_PROJECTIONS)
