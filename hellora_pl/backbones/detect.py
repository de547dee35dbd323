"""Describe an MoE model from the model itself, for families whose experts use transformers' experts interface.

transformers 5 marks fused experts with `@use_experts_implementation`, which sets layout flags
on each experts instance (has_gate, has_bias, has_post_expert_norm, is_transposed,
is_concatenated). `detect_architecture(model)` finds those modules and reads the rest of an
`MoEArchitecture` off the module tree: the decoder layers, the MoE block (the experts' parent),
the router (the block's child with an [E, H] weight), shared experts (a child MLP), attention
(`self_attn`'s nn.Linear projections) and the config fields of E and top-k. Routing is read at
the experts' input ("experts_input"), so the counts are the experts the model ran, whatever
its router does.

Every expert layout of the interface is detected (`kernels.layout.ExpertLayout`: gated or not,
transposed, biased, interleaved, post-expert norm; the expert projections follow it). Structure:
every decoder layer with `self_attn`, the MoE block a child of the
layer with no dense MLP beside it. Anything else is refused by name (`DetectionRefused`) with the
reason and the fix, never run with a path that would compute something else.
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn

from ..kernels.layout import ExpertLayout
from .architecture import MoEArchitecture, _get, acts_as_linear

LAYOUT_FLAGS = ("has_gate", "has_bias", "has_post_expert_norm", "is_transposed", "is_concatenated")
DETECTED = "detected"

LAYER_PATHS = (
    "model.layers",  # causal LM
    "model.language_model.layers",  # multimodal wrapper: its text decoder
    "language_model.model.layers",  # a wrapper holding a whole causal LM (nemotron_h_omni)
)
# Where a decoder layer keeps its token mixer (attention, linear attention, DeltaNet, Mamba, conv).
MIXER_PATHS = ("self_attn", "linear_attn", "mamba", "conv", "mixer")
CONFIG_PATHS = ("", "text_config")  # where the expert counts live: the model's config, a wrapper's text config
NUM_EXPERTS_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k_experts", "moe_k", "top_k")
AUX_LOSS_FIELD = "router_aux_loss_coef"
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION = "self_attn"
ROUTER_CHILDREN = ("gate", "router")  # where a router lives in an MoE block, when its weight is not [E, H]
SHARED_EXPERTS_FIELD = "n_shared_experts"


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
    """What about this experts module's layout the adapted expert path does not run ([] when it runs it).

    Every flag combination runs (`kernels.layout`); what is refused is a module whose tensors do not match
    its flags, or expert parallelism."""
    try:
        ExpertLayout.of(experts)
    except NotImplementedError as error:
        return [str(error)]
    return []


def detect_architecture(model: nn.Module) -> MoEArchitecture | None:
    """An MoEArchitecture read from `model`, None for a dense model (no experts-interface modules and no
    routed experts in its config).

    Raises DetectionRefused (naming the reason) for a model that has them in a layout or structure
    hellora_pl does not handle.
    """
    config = model.config
    model_type = getattr(config, "model_type", None)
    experts_modules = [m for m in model.modules() if is_experts_interface(m)]

    def refuse(reason: str):
        raise DetectionRefused(model_type, reason)

    if not experts_modules:
        routed = _config_field(config, NUM_EXPERTS_FIELDS, lambda v: isinstance(v, int) and v > 1)
        if routed is not None:
            refuse(_outside_the_interface(model, routed))
        return None

    layouts = sorted({why for experts in experts_modules for why in layout_refusals(experts)})
    if layouts:
        refuse(
            f"its experts ({type(experts_modules[0]).__name__}) have {', '.join(layouts)}, which the adapted expert path does not run"
        )
    layers_path, layers = _decoder_layers(model)
    if layers is None:
        refuse(
            f"its decoder layers are at none of {', '.join(LAYER_PATHS)} (a wrapped model detection does not know); "
            "load its causal-LM or text-decoder class instead"
        )
    experts_paths = set()
    for layer in layers:
        experts_paths |= {name for name, module in layer.named_modules() if is_experts_interface(module)}
    if len(experts_paths) != 1:
        refuse(f"its decoder layers hold experts at different paths ({', '.join(sorted(experts_paths))})")
    (experts_path,) = experts_paths
    # Experts that are a direct child of the layer (Gemma 4): the MoE block is the layer itself ("").
    block_path, experts_name = experts_path.rsplit(".", 1) if "." in experts_path else ("", experts_path)
    mixers = _layer_mixers(layers, block_path, experts_name, refuse)
    moe_layers = [layer for layer in layers if _get(layer, experts_path, default=None) is not None]
    first_block = _get(moe_layers[0], block_path)
    experts = getattr(first_block, experts_name)
    layout = ExpertLayout.of(experts)
    num_experts, hidden = layout.num_experts, layout.hidden
    extra_rows = _router_extra_rows(config)
    router = _router_name(first_block, (experts_name, *MIXER_PATHS), num_experts, hidden, extra_rows)
    if router is None:
        wider = " or ".join(str(num_experts + extra) for extra in extra_rows)
        refuse(
            f"its MoE block ({type(first_block).__name__}) has no child with an [{num_experts}, {hidden}] "
            "router weight, "
            f"nor one logits layer of {wider} rows in its {' or '.join(ROUTER_CHILDREN)} child, "
            "so the router adapter has no weight to adapt"
        )
    if block_path and "." not in block_path:  # the layer as the block (""): its dense MLP is the shared expert
        dense = [n for n, child in moe_layers[0].named_children() if n != block_path and _is_mlp(child)]
        if dense:
            refuse(f"its decoder layers have a dense MLP ({', '.join(dense)}) beside the MoE block ({block_path})")
    shared = [n for n, child in first_block.named_children() if n != router.split(".")[0] and _is_mlp(child)]
    if len(shared) > 1:
        refuse(f"its MoE block has several shared-expert MLPs ({', '.join(shared)})")
    num_experts_field = _config_field(config, NUM_EXPERTS_FIELDS, lambda value: value == num_experts)
    top_k_field = _config_field(config, TOP_K_FIELDS, lambda value: isinstance(value, int))
    if num_experts_field is None or top_k_field is None:
        missing = [
            what for what, field in (("number of experts", num_experts_field), ("top-k", top_k_field)) if field is None
        ]
        refuse(f"its config has no field of the {' and '.join(missing)} that detection knows")
    projections, left_out = _mixer_projections(mixers)
    return MoEArchitecture(
        name=str(model_type),
        model_types=(str(model_type),),
        layers=layers_path,
        attention=ATTENTION,
        attention_projections=projections,
        mixers=tuple(path for path in MIXER_PATHS if any(path == found for found, _ in mixers)),
        moe_block=block_path,
        router=router,
        experts=experts_name,
        shared_experts=shared[0] if shared else None,
        routing="experts_input",
        expert_projections=layout.projections,
        num_experts_field=num_experts_field,
        top_k_field=top_k_field,
        aux_loss_field=AUX_LOSS_FIELD if hasattr(config, AUX_LOSS_FIELD) else None,
        notes=DETECTED,
        left_out=left_out + _shared_left_out(first_block, block_path, shared),
    )


def _linear_children(module: nn.Module) -> tuple[str, ...]:
    return tuple(name for name, child in module.named_children() if isinstance(child, nn.Linear))


def _layer_mixers(layers: list[nn.Module], block_path: str, experts_name: str, refuse) -> list[tuple[str, nn.Module]]:
    """(path, module) of each layer's token mixer that is not its MoE block (NemotronH's `mixer` is the
    MoE block in its MoE layers: no attention there). Refuses a layer that has neither."""
    found, lacking = [], set()
    for layer in layers:
        block = _get(layer, block_path, default=None)
        present = [(p, _get(layer, p)) for p in MIXER_PATHS if _get(layer, p, default=None) is not None]
        mixers = [(p, m) for p, m in present if not (m is block and _get(block, experts_name, default=None) is not None)]
        if mixers:
            found.append(mixers[0])
        elif not present:
            lacking |= {name for name, _ in layer.named_children()}
    if lacking:
        refuse(
            f"some decoder layers have no token mixer at {', '.join(MIXER_PATHS)} (children of those layers: "
            f"{', '.join(sorted(lacking))})"
        )
    return found


def _mixer_projections(mixers: list[tuple[str, nn.Module]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adapted, left out): the linear children of the layers' mixers, in first-seen order, without dense MLP
    mixers (NemotronH's MLP layers). Left out, each as "path (why)": a projection whose weight the mixer's code
    reads directly (Mamba's `self.dt_proj.weight @ ...`, a fused `outproj_weight=self.out_proj.weight`), where
    LoRA would be bypassed, and an nn.Linear subclass with a forward of its own (DeepSeek-V4's grouped
    `o_a_proj`), where LoRA's B A x would not match the map it runs."""
    names: dict[str, None] = {}
    left_out: dict[str, None] = {}
    for path, mixer in mixers:
        if _is_feed_forward(mixer):
            continue
        bypassed = _weights_read_directly(type(mixer))
        for name in _linear_children(mixer):
            child = getattr(mixer, name)
            if name in bypassed:
                left_out[f"{path}.{name} (its weight is read directly by {type(mixer).__name__})"] = None
            elif not acts_as_linear(child):
                left_out[f"{path}.{name} ({type(child).__name__} runs a forward of its own, not x W^T + b)"] = None
            else:
                names[name] = None
    return tuple(names), tuple(left_out)


@functools.cache
def _weights_read_directly(mixer_class: type) -> frozenset[str]:
    """Children whose `.weight` the class's code reads (`self.<name>.weight`), not calling the child."""
    try:
        source = inspect.getsource(mixer_class)
    except (OSError, TypeError):  # no source (built at run time): nothing is known to be read directly
        return frozenset()
    return frozenset(re.findall(r"self\.(\w+)\.weight\b", source))


def _is_feed_forward(module: nn.Module) -> bool:
    return isinstance(getattr(module, "down_proj", None), nn.Linear) and isinstance(
        getattr(module, "up_proj", None), nn.Linear
    )


def _outside_the_interface(model: nn.Module, routed_field: str) -> str:
    """Why an MoE model whose experts skip transformers' experts interface is refused (Llama-4, JetMoE, ...)."""
    classes = sorted({type(m).__name__ for m in model.modules() if "expert" in type(m).__name__.lower()})
    named = f" ({', '.join(classes)})" if classes else ""
    return (
        f"its experts{named} do not use transformers' experts interface "
        f"(@use_experts_implementation), the seam the adapted expert path plugs into, though its config declares "
        f"routed experts ({routed_field} = {_get(model.config, routed_field)}): expert adapters would never run. "
        "A ModuleList of nn.Linear expert MLPs can be described with MoEArchitecture(expert_layout='module_list', ...)"
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _config_field(config, names: tuple[str, ...], accept) -> str | None:
    """The first of `names` on the config (then on a wrapper's text config) whose value `accept`s, as a dotted path."""
    for part in CONFIG_PATHS:
        holder = _get(config, part, default=None) if part else config
        for name in names if holder is not None else ():
            if accept(getattr(holder, name, None)):
                return _join(part, name)
    return None


def _decoder_layers(model: nn.Module) -> tuple[str, list[nn.Module] | None]:
    for path in LAYER_PATHS:
        layers = _get(model, path, default=None)
        if isinstance(layers, nn.ModuleList):
            return path, list(layers)
    return "", None


def _router_extra_rows(config) -> tuple[int, ...]:
    """How many rows beyond the E routed experts a router's logits layer may hold: one "no expert" class
    (ZAYA's skip expert), or the shared experts' gates (Inkling scores its `n_shared_experts` with the same
    weight)."""
    field = _config_field(config, (SHARED_EXPERTS_FIELD,), lambda value: isinstance(value, int) and value > 0)
    return tuple(sorted({1, _get(config, field) if field else 1}))


def _router_name(
    block: nn.Module, skipped: tuple[str, ...], num_experts: int, hidden: int, extra_rows: tuple[int, ...] = ()
) -> str | None:
    """The path of the block's module whose `weight` is [E, H] ("gate", or "router.gate" inside a router
    module), outside its `skipped` children (the experts, and mixers when the block is the layer); None
    when there is none or several.

    Without one, the router's logits layer: the one 2D weight inside the block's `gate`/`router` child with
    E + `extra_rows` rows, whatever its input (Inkling's [E + shared, H] gate, the last layer of ZAYA's
    router MLP [E + 1, router_hidden_size]). A router adapter there changes the expert logits as on [E, H]."""
    found = _weights(block, skipped, lambda shape: shape == (num_experts, hidden))
    if len(found) > 1:  # a same-shaped projection beside the router (Gemma 4's per_layer_input_gate): take the router's
        found = [name for name in found if "router" in name.split(".")[0]]
    if not found:
        found = [
            name
            for name in _weights(block, skipped, lambda shape: len(shape) == 2 and shape[0] - num_experts in extra_rows)
            if name.split(".")[0] in ROUTER_CHILDREN
        ]
    return found[0] if len(found) == 1 else None


def _weights(block: nn.Module, skipped: tuple[str, ...], accept) -> list[str]:
    """Paths of the block's modules outside `skipped` children whose `weight` shape `accept`s."""
    return [
        name
        for name, child in block.named_modules()
        if name
        and name.split(".")[0] not in skipped
        and accept(tuple(getattr(getattr(child, "weight", None), "shape", ())))
    ]


def _shared_left_out(block: nn.Module, block_path: str, shared: list[str]) -> tuple[str, ...]:
    """Shared experts detection cannot adapt, each "path (why)": a `shared*` child of the block that holds its
    projections as batched [S, out, in] tensors (Inkling's InklingSharedExperts), not nn.Linear children, so
    methods that adapt shared experts say they did not."""
    return tuple(
        f"{_join(block_path, name)} ({type(child).__name__} holds its projections as [S, out, in] tensors, "
        "not nn.Linear children)"
        for name, child in block.named_children()
        if "shared" in name and name not in shared and any(p.dim() == 3 for p in child.parameters(recurse=False))
    )


def _is_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Linear) for name in MLP_PROJECTIONS)
