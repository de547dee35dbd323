"""Adapter sites: the one list of every adapter a plan puts into a model.

`adapter_sites(model, plan)` is the only walk over a model's adaptable modules. Injection builds
its adapters from the list, and the counts (trainable parameters, allocated elements, gradients),
the adapter FLOPs of the budget tool and the memory estimate are sums over it, so they cannot
drift from what injection builds.

A site is one adapted matrix shape at one place: an attention projection, a router, a shared-expert
projection (these act on every token), or one projection of a MoE layer's routed experts, covering
that layer's hot experts (these act on each routed (token, expert) pair that lands on them).

Counting rules (matrices are [out, in]):
  LoRA  r (out + in) parameters and 2 r (in + out) forward FLOPs per row it acts on;
  LoRI  (HELLoRI) trains B only: round(kept x r x out) per matrix, kept = the density once the
        mask is in force, 1 before; it holds A and a dense B, and its FLOPs are LoRA's (no
        sparse kernels);
  full  (ESFT) out x in parameters and 2 out in FLOPs per adapted expert matrix.
A routed site counts each hot expert at its active rank (DR-LoRA), else at the allocated rank.

Hybrid decoders (layers whose token mixer is attention, linear attention, DeltaNet or Mamba): each
layer's attention sites are the projections of its own mixer (`MoEArchitecture.layer_mixer`) that
the plan adapts on that layer type (`plan.mixer_projections`, keyed by the mixer's class), so a
projection counts once per layer that has it; a layer without a mixer (its mixer is the MoE block)
has no attention site.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..backbones import architecture_for
from .linear import LoRALinear
from .plan import AdapterPlan, LayerPlan
from .router import router_lora

SiteKind = Literal["attention", "router", "shared_expert", "routed_expert"]
TOKEN_KINDS = ("attention", "router", "shared_expert")


@dataclass(frozen=True)
class AdapterSite:
    """One adapted matrix (or, for routed experts, one projection of a layer's hot experts).

    `module` is the qualified name of the module holding the matrix and `name` the matrix there:
    an nn.Linear child (attention, shared expert; for ModuleList experts the per-expert linears
    `module.<e>.<name>`), the router's `weight`, or a fused experts tensor [E, out, in].
    `rank` is the allocated LoRA rank (None for a full-rank delta); `active_ranks` the rank in use
    per hot expert. `form` is "lora", "lori" or "full".
    """

    kind: SiteKind
    layer: int  # decoder layer index
    module: str
    name: str
    shape: tuple[int, int]  # (out, in)
    form: Literal["lora", "lori", "full"]
    rank: int | None
    experts: tuple[int, ...] = ()
    active_ranks: tuple[int, ...] | None = None
    where: str = ""  # for error messages: "layer 3 self_attn.q_proj"

    @property
    def per_token(self) -> bool:
        """Acts on every token (attention, router, shared expert), not per routed selection."""
        return self.kind in TOKEN_KINDS

    @property
    def ranks(self) -> tuple[int, ...]:
        """The rank in use per matrix: one for a token site, one per hot expert for a routed site."""
        if self.kind != "routed_expert":
            return (self.rank,)
        return self.active_ranks if self.active_ranks is not None else (self.rank,) * len(self.experts)

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"


def adapter_sites(model: nn.Module, plan: AdapterPlan) -> list[AdapterSite]:
    """Every adapter site of `plan` in `model`, in the order injection builds them.

    That order (attention of every layer, then each MoE layer's router and shared expert, then
    each layer's routed experts) fixes how the random initialisation is drawn. Raises with the fix
    when the plan names a module the model lacks.
    """
    arch = architecture_for(model)
    if arch.name != plan.architecture:
        raise ValueError(f"The plan was made for {plan.architecture!r} but the model is {arch.name!r}.")
    names = {id(module): name for name, module in model.named_modules()}
    lora = "lori" if plan.lori is not None else "lora"
    sites: list[AdapterSite] = []
    for index, layer in enumerate(arch.decoder_layers(model)):
        attention = arch.attention_module(layer)
        if attention is None:
            continue
        path, projections = arch.layer_mixer(layer)
        where = f"layer {index} {path}"
        for name in _adapted_projections(plan, attention, projections, where):
            shape = _linear_shape(attention, name, where)
            sites.append(
                AdapterSite(
                    "attention", index, names[id(attention)], name, shape, lora, plan.rank, where=f"{where}.{name}"
                )
            )
    moe_layers = {moe.index: moe for moe in arch.moe_layers(model)}
    unknown = sorted(set(plan.hot_experts()) - set(moe_layers))
    if unknown:
        raise ValueError(f"The plan names MoE layers {unknown} that this model does not have.")
    for index, moe in moe_layers.items():
        if plan.router_rank is not None:
            shape = _router_shape(moe.router)
            where = f"layer {index} router"
            sites.append(
                AdapterSite(
                    "router", index, names[id(moe.router)], "weight", shape, lora, plan.router_rank, where=where
                )
            )
        if moe.shared is not None:
            for name in plan.shared_expert_modules:
                where = f"layer {index} shared experts"
                shape = _linear_shape(moe.shared, name, where)
                sites.append(
                    AdapterSite(
                        "shared_expert",
                        index,
                        names[id(moe.shared)],
                        name,
                        shape,
                        lora,
                        plan.rank,
                        where=f"{where}.{name}",
                    )
                )
    for layer_plan in plan.layers:
        if plan.expert_modules and layer_plan.hot_experts:
            sites.extend(_routed_sites(arch, moe_layers[layer_plan.layer], layer_plan, plan, names, lora))
    return sites


def _layer_type(mixer_class: str, projections: Sequence[str], by_projections: bool) -> str:
    """A layer type's key in `plan.mixer_projections`: the mixer's class, or the class with its
    projections where one class comes with several sets (Gemma-4: full-attention layers without v_proj)."""
    return f"{mixer_class}({','.join(projections)})" if by_projections else mixer_class


def _adapted_projections(plan: AdapterPlan, mixer: nn.Module, projections: Sequence[str], where: str) -> list[str]:
    """The projections `plan` adapts on a layer whose attention-like module is `mixer` with `projections`."""
    if not plan.mixer_projections:
        return plan.attention_modules
    kind = type(mixer).__name__
    if kind not in plan.mixer_projections:
        kind = _layer_type(kind, projections, by_projections=True)
    if kind not in plan.mixer_projections:
        raise ValueError(
            f"{where} is a {kind}, a layer type the plan does not know ({', '.join(plan.mixer_projections)}); "
            "the plan was made for another model: build it on this one."
        )
    return plan.mixer_projections[kind]


def mixer_projections(model: nn.Module, attention_modules: Sequence[str]) -> dict[str, list[str]]:
    """Per layer type (the class of a layer's attention-like module), which of `attention_modules`
    it has: what a plan records for a hybrid decoder. {} when every layer has the same module and all
    of them (a uniform decoder: `attention_modules` says it all, as in plans before hybrids). Raises
    when a name is on no layer."""
    arch = architecture_for(model)
    found_sets: dict[str, list[tuple[str, ...]]] = {}  # mixer class -> its distinct projection sets
    without = False
    for layer in arch.decoder_layers(model):
        found = arch.layer_mixer(layer)
        if found is None:
            without = True
            continue
        sets = found_sets.setdefault(type(_module_at(layer, found[0])).__name__, [])
        if found[1] not in sets:
            sets.append(found[1])
    kinds = {
        _layer_type(mixer_class, names, by_projections=len(sets) > 1): names
        for mixer_class, sets in found_sets.items()
        for names in sets
    }
    unknown = [name for name in attention_modules if not any(name in names for names in kinds.values())]
    if unknown:
        have = {kind: list(names) for kind, names in kinds.items()}
        raise ValueError(f"No decoder layer of {arch.name} has attention projections {unknown}; its layers have {have}.")
    chosen = {kind: [n for n in attention_modules if n in names] for kind, names in kinds.items()}
    if len(chosen) <= 1 and not without and all(names == list(attention_modules) for names in chosen.values()):
        return {}
    return chosen


def _module_at(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def _linear_shape(parent: nn.Module, name: str, where: str) -> tuple[int, int]:
    base = getattr(parent, name, None)
    if isinstance(base, LoRALinear):  # a model the plan is already injected into
        base = base.base_layer
    if not isinstance(base, nn.Linear):
        raise ValueError(f"{where} has no nn.Linear {name!r} to adapt; check the plan's module names.")
    return (base.out_features, base.in_features)  # not .weight: a 4-bit linear would dequantize it


def _router_shape(router: nn.Module) -> tuple[int, int]:
    """(E, H) of a router's weight; with a router LoRA attached, read off it rather than by running the
    weight's parametrizations (4-bit dequantization, and under FSDP sharded inputs)."""
    lora = router_lora(router)
    if lora is not None:
        return (lora.lora_B.shape[0], lora.lora_A.shape[1])
    return tuple(router.weight.shape)


def _routed_sites(arch, moe, layer_plan: LayerPlan, plan: AdapterPlan, names, lora: str) -> list[AdapterSite]:
    shapes = arch.expert_shapes(moe.experts)
    missing = [name for name in plan.expert_modules if name not in shapes]
    if missing:
        raise ValueError(f"Experts of {arch.name} have no projections {missing}; they have {list(shapes)}.")
    full = plan.expert_adapter == "full"
    ranks = tuple(layer_plan.expert_ranks) if layer_plan.expert_ranks is not None and not full else None
    return [
        AdapterSite(
            "routed_expert",
            layer_plan.layer,
            names[id(moe.experts)],
            name,
            tuple(shapes[name]),
            "full" if full else lora,
            None if full else plan.allocated_expert_rank,
            tuple(layer_plan.hot_experts),
            ranks,
            where=f"layer {layer_plan.layer} experts",
        )
        for name in plan.expert_modules
    ]


def with_expert_rank(sites: Iterable[AdapterSite], rank: int) -> list[AdapterSite]:
    """The sites with every routed LoRA expert at `rank` (DR-LoRA's budget or its allocation)."""
    return [
        dataclasses.replace(s, active_ranks=(rank,) * len(s.experts)) if s.kind == "routed_expert" and s.rank else s
        for s in sites
    ]


# -- counting ---------------------------------------------------------------------------------


def _matrix_params(site: AdapterSite, rank: int | None, kept_share: float | None) -> int:
    """Parameters of one matrix of `site` at `rank`: kept_share None counts A and B, else B's share."""
    out_features, in_features = site.shape
    if site.form == "full":
        return out_features * in_features
    if kept_share is None:
        return rank * (out_features + in_features)
    return round(kept_share * rank * out_features)


def trainable_params(sites: Iterable[AdapterSite], plan: AdapterPlan) -> int:
    """Adapter parameters that train and act on the output now: LoRA at each active rank, LoRI's B
    times its kept share, ESFT's deltas in full."""
    kept = plan.lori.kept_share if plan.lori is not None else None
    return sum(_matrix_params(s, r, kept if s.form == "lori" else None) for s in sites for r in s.ranks)


def allocated_elements(sites: Iterable[AdapterSite]) -> int:
    """Every adapter tensor element held: A and a dense B at the allocated rank (LoRI, DR-LoRA too)."""
    return sum(_matrix_params(s, s.rank, None) * (len(s.experts) or 1) for s in sites)


def gradient_elements(sites: Iterable[AdapterSite]) -> int:
    """Elements of the tensors that get a gradient: LoRI's dense B only (A frozen), all else held."""
    return sum(_matrix_params(s, s.rank, 1.0 if s.form == "lori" else None) * (len(s.experts) or 1) for s in sites)


def matrix_flops(site: AdapterSite, rank: int | None) -> int:
    """Forward FLOPs of one matrix of `site` per row it acts on (a multiply-add is 2 FLOPs)."""
    out_features, in_features = site.shape
    if site.form == "full":
        return 2 * out_features * in_features
    return 2 * rank * (in_features + out_features)


def adapter_flops(sites: Sequence[AdapterSite], layers: Sequence[int], top_k: int, shares: torch.Tensor | None) -> dict:
    """Forward adapter FLOPs per token by kind, and the mean share of routed selections on adapted experts.

    `layers` are the MoE layers in the order of the rows of `shares` ([MoE layers, E]: the share of
    a layer's selections each expert takes). Token sites count once per token; a routed site's
    expert e counts P(e) x top_k per token. With `shares` None every selection is adapted (LoRA on
    every expert): top_k per token for each matrix, whatever the routing.
    """
    parts = {"attention": 0, "router": 0, "shared_experts": 0, "experts": 0.0}
    key = {"attention": "attention", "router": "router", "shared_expert": "shared_experts"}
    routed: dict[int, list[AdapterSite]] = {}
    for site in sites:
        if site.per_token:
            parts[key[site.kind]] += matrix_flops(site, site.rank)
        else:
            routed.setdefault(site.layer, []).append(site)
    covered = []
    for slot, layer in enumerate(layers):
        group = routed.get(layer, [])
        if not group:
            covered.append(0.0)
            continue
        experts = group[0].experts
        if shares is None:
            parts["experts"] += top_k * sum(matrix_flops(s, s.rank) for s in group)
            covered.append(1.0)
            continue
        for position, expert in enumerate(experts):
            per_selection = sum(matrix_flops(s, s.ranks[position]) for s in group)
            parts["experts"] += float(shares[slot, expert]) * top_k * per_selection
        covered.append(float(shares[slot, list(experts)].sum()))
    parts["total"] = parts["attention"] + parts["router"] + parts["shared_experts"] + parts["experts"]
    parts["adapted_selection_share"] = sum(covered) / len(covered) if covered else 0.0
    return parts


# -- the plan's own counts --------------------------------------------------------------------


def lora_everywhere(model: nn.Module, rank: int) -> AdapterPlan:
    """Plain LoRA at `rank` on every attention projection, router, shared expert and expert."""
    arch = architecture_for(model)
    num_experts = arch.num_experts(model.config)
    return AdapterPlan(
        method="lora",
        architecture=arch.name,
        num_experts=num_experts,
        top_k=arch.top_k(model.config),
        policy={"name": "all"},
        rank=rank,
        alpha=rank,
        router_rank=rank,
        attention_modules=arch.attention_projections_of(model),
        mixer_projections=mixer_projections(model, arch.attention_projections_of(model)),
        expert_modules=list(arch.expert_projections),
        shared_expert_modules=list(arch.shared_expert_projections) if arch.shared_experts else [],
        layers=[LayerPlan(moe.index, list(range(num_experts))) for moe in arch.moe_layers(model)],
    )


def count_plan_params(model: nn.Module, plan: AdapterPlan) -> int:
    """Adapter parameters of `plan` in `model` that train and act on the output (see the module docstring)."""
    return trainable_params(adapter_sites(model, plan), plan)


def count_lora_baseline_params(model: nn.Module, rank: int) -> int:
    """Plain LoRA at `rank` on every attention projection, router, shared expert and expert."""
    baseline = lora_everywhere(model, rank)
    return trainable_params(adapter_sites(model, baseline), baseline)


def update_trainable_params(model: nn.Module, plan: AdapterPlan) -> int:
    """Recount `plan.trainable_params` after a companion changed the plan (LoRI mask, DR-LoRA ranks)."""
    plan.trainable_params = count_plan_params(model, plan)
    return plan.trainable_params
