"""Budget of a method on a backbone, before any training: `python -m hellora_pl.budget`.

For one backbone (a built-in shape, a local config.json, or a hub id) and one method, print
the numbers that decide between methods. The model is built on the meta device (shapes only,
no memory); the adapter placement is the same `build_plan` a fit uses.

How each figure is counted
--------------------------
Matrices are [out, in]. Fused experts count as the model stores them: transformers 5 keeps
gate and up as ONE [2I, H] matrix (`gate_up_proj`) and `down_proj` as [H, I], so one expert
LoRA has r (2I + H) + r (H + I) parameters, not the r (I + H) x 3 of three separate matrices.

Parameters
  trainable parameters  `plan.trainable_params`: LoRA r (out + in) per adapted matrix, at the
      attention/shared-expert rank, the router rank, and each expert's rank; ESFT's full-rank
      deltas out x in per adapted expert matrix; LoRI (HELLoRI) counts B only (A stays frozen
      at its init) times the kept density, i.e. with the sparsity mask in force. DR-LoRA's
      ranks start small and grow until they fill the budget of a uniform rank r on the same
      experts; its figure is that full budget (= LoRA at r on those experts); the count at the
      start (rank_init) and the allocation (every expert at r_max, masked) are listed too.
  adapter parameters allocated  every adapter tensor held in memory: LoRI's frozen A and its
      dense B, DR-LoRA at r_max.
  share of the model  trainable / every parameter of the base (embeddings included).
  LoRA-on-all  `plan.lora_all_experts_params`: LoRA at r on every attention projection, the
      router, the shared experts and every expert of every MoE layer.

Adapter FLOPs per token (forward only; a multiply-add is 2 FLOPs; adds, scaling, dropout
and the backward are not counted; the backward is about twice the forward for each)
  LoRA on a matrix costs x A^T then (.) B^T: 2 r (in + out) per row it acts on; a full-rank
  delta costs 2 in out. LoRI is counted with a dense B (no sparse kernels), like LoRA.
  attention, router and shared-expert adapters act on every token: summed once per layer.
  Expert adapters act per routed (token, expert) pair: each MoE layer adds
      sum over its adapted experts e of  P(e) * top_k * flops_per_selection(e),
  P(e) = counts[l, e] / counts[l].sum() from the routing profile, or 1/E when routing is
  assumed uniform. LoRA-on-all's expert term is top_k * flops_per_selection whatever the
  routing (its P sums to 1 over all experts). DR-LoRA is counted at the full budget (r on
  every adapted expert); its forward as executed runs at r_max with masked rank slices,
  listed as a separate figure.

Base model
  total parameters  every parameter once (tied embeddings once).
  active parameters per token  every parameter except the input embedding (a lookup, no
      matmul), with each MoE layer's routed experts counted as top_k of E; shared experts,
      dense layers, attention, routers, norms and lm_head in full.
  forward FLOPs per token  2 x active parameters (attention scores over the sequence are not
      counted: they depend on context length, not on the method).
  weight memory at 16 bits  2 bytes per parameter.
  weight memory at 4 bits  NF4 as bitsandbytes stores it: every weight with 2+ dimensions
      (attention, MLP, expert and router matrices) takes 0.5 byte per weight plus one fp32
      absmax per 64-weight block (0.5625 byte per weight; per tensor ceil(n/2) + 4 ceil(n/64)
      bytes, no double quantization); the input embedding, lm_head, norms and biases stay
      16-bit.

With --memory the report adds the predicted peak GPU memory of one training step (weights,
adapters, gradients, optimizer state, activations with and without checkpointing, transients,
FSDP sharding); those rules are in the docstring of `hellora_pl/memory.py`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from .adapters import METHODS, build_plan, count_plan_params
from .adapters.common import check_rank
from .adapters.methods import method_defaults
from .adapters.plan import AdapterPlan, DynamicRankSpec, LoRISpec
from .backbones import architecture_for, supported_model_types
from .backbones.shapes import SHAPES, meta_model, shape_config
from .memory import QUANTIZATIONS, MemorySettings, memory_report
from .routing import CoveragePerLayer, RoutingProfile, TopKPerLayer

NF4_BLOCK = 64
HOT_K_METHODS = ("hellora", "hellori")


# -- the backbone -------------------------------------------------------------------------


def load_config(shape: str | None = None, config: str | None = None, model: str | None = None):
    """The transformers config of a built-in shape, a local config.json (or its folder), or a hub id.

    Returns (config, description of the source).
    """
    from transformers import AutoConfig

    if shape is not None:
        cfg = shape_config(shape)
        return cfg, f"shape {shape} ({SHAPES[shape].hub_id})"
    if config is not None:
        path = Path(config).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"Config path {config!r} does not exist; give a config.json or a directory holding one "
                "(or use --shape NAME / --model HUB_ID)."
            )
        if path.is_dir():
            path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(
                    f"Directory {config!r} holds no config.json; give the model's config.json or its directory."
                )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{str(path)!r} is not valid JSON ({exc}); give the model's config.json.") from None
        model_type = data.get("model_type") if isinstance(data, dict) else None
        _check_model_type(model_type, str(path))
        try:
            cfg = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(
                f"transformers could not read {str(path)!r} as a {model_type!r} config ({_one_line(exc, 200)}); "
                "budget builds only model types transformers ships (no remote code)."
            ) from None
        return cfg, f"config {path}"
    if model is not None:
        try:
            cfg = AutoConfig.from_pretrained(model)
        except Exception as exc:  # offline, unknown id, gated repo, remote code: all end here
            raise ValueError(
                f"Could not read the config of {model!r} from the Hugging Face Hub ({type(exc).__name__}: "
                f"{_one_line(exc, 200)}); check the id and the network, or use --config with a local config.json "
                "or --shape NAME."
            ) from None
        _check_model_type(getattr(cfg, "model_type", None), model)
        return cfg, f"hub {model}"
    raise ValueError("Give a backbone: --shape NAME, --config PATH or --model HUB_ID.")


def _check_model_type(model_type, where: str) -> None:
    if model_type is None:
        raise ValueError(f"{where!r} has no model_type field; give a transformers config.json.")
    if model_type not in supported_model_types():
        raise ValueError(
            f"Model type {model_type!r} (from {where}) is not supported by hellora_pl; supported: "
            f"{', '.join(supported_model_types())}."
        )


def _one_line(exc: BaseException, limit: int | None = None) -> str:
    text = " ".join(str(exc).split())
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


# -- routing ------------------------------------------------------------------------------


def uniform_profile(model: nn.Module) -> RoutingProfile:
    """Every expert of every MoE layer selected equally often (E tokens, top_k selections each)."""
    arch = architecture_for(model)
    layers = [moe.index for moe in arch.moe_layers(model)]
    num_experts, top_k = arch.num_experts(model.config), arch.top_k(model.config)
    counts = torch.full((len(layers), num_experts), top_k, dtype=torch.int64)
    return RoutingProfile(layers, counts, torch.ones(len(layers), num_experts, dtype=torch.float64), num_experts, top_k)


def selection_shares(profile: RoutingProfile) -> torch.Tensor:
    """P(a selection of layer l goes to expert e), [L, E]; a layer with no selections is an error."""
    totals = profile.counts.sum(dim=1)
    empty = [profile.layers[i] for i in range(len(profile.layers)) if int(totals[i]) == 0]
    if empty:
        raise ValueError(f"The routing profile has no selections in MoE layers {empty}; profile on more data.")
    return profile.load()


# -- counting -----------------------------------------------------------------------------


def _lora_flops(shape: tuple[int, int], rank: int) -> int:
    out_features, in_features = shape
    return 2 * rank * (in_features + out_features)


def _full_flops(shape: tuple[int, int]) -> int:
    out_features, in_features = shape
    return 2 * out_features * in_features


def _with_expert_ranks(plan: AdapterPlan, rank: int) -> AdapterPlan:
    """A copy of `plan` whose adapted experts all sit at `rank` (DR-LoRA's budget or allocation)."""
    other = copy.deepcopy(plan)
    for layer in other.layers:
        layer.expert_ranks = [rank] * len(layer.hot_experts)
    return other


def adapter_flops(model: nn.Module, plan: AdapterPlan, shares: torch.Tensor, expert_rank: int | None = None) -> dict:
    """Forward adapter FLOPs per token of `plan`, by part, and the share of selections on adapted experts.

    `expert_rank` overrides every expert adapter's rank (DR-LoRA's budget or r_max); otherwise
    each expert counts at its planned rank (`expert_ranks`, else the allocated rank).
    """
    arch = architecture_for(model)
    top_k = arch.top_k(model.config)
    parts = {"attention": 0, "router": 0, "shared_experts": 0, "experts": 0.0}
    for layer in arch.decoder_layers(model):
        attention = arch.attention_module(layer)
        for name in plan.attention_modules:
            parts["attention"] += _lora_flops(tuple(getattr(attention, name).weight.shape), plan.rank)
    layer_plans = {layer.layer: layer for layer in plan.layers}
    covered = []
    for slot, moe in enumerate(arch.moe_layers(model)):
        if plan.router_rank is not None:
            parts["router"] += _lora_flops(tuple(moe.router.weight.shape), plan.router_rank)
        if moe.shared is not None:
            for name in plan.shared_expert_modules:
                parts["shared_experts"] += _lora_flops(tuple(getattr(moe.shared, name).weight.shape), plan.rank)
        layer_plan = layer_plans.get(moe.index)
        hot = layer_plan.hot_experts if layer_plan is not None else []
        if not plan.expert_modules or not hot:
            covered.append(0.0)
            continue
        shapes = arch.expert_shapes(moe.experts)
        if expert_rank is not None:
            ranks = [expert_rank] * len(hot)
        else:
            ranks = layer_plan.expert_ranks or [plan.allocated_expert_rank] * len(hot)
        for expert, rank in zip(hot, ranks):
            if plan.expert_adapter == "full":
                per_selection = sum(_full_flops(shapes[name]) for name in plan.expert_modules)
            else:
                per_selection = sum(_lora_flops(shapes[name], rank) for name in plan.expert_modules)
            parts["experts"] += float(shares[slot, expert]) * top_k * per_selection
        covered.append(float(shares[slot, hot].sum()))
    parts["total"] = parts["attention"] + parts["router"] + parts["shared_experts"] + parts["experts"]
    parts["adapted_selection_share"] = sum(covered) / len(covered) if covered else 0.0
    return parts


def lora_all_flops(model: nn.Module, rank: int) -> int:
    """Forward FLOPs per token of LoRA at `rank` on attention, router, shared experts and every expert."""
    arch = architecture_for(model)
    top_k = arch.top_k(model.config)
    total = 0
    projections = arch.attention_projections_of(model)
    for layer in arch.decoder_layers(model):
        attention = arch.attention_module(layer)
        total += sum(_lora_flops(tuple(getattr(attention, n).weight.shape), rank) for n in projections)
    for moe in arch.moe_layers(model):
        total += _lora_flops(tuple(moe.router.weight.shape), rank)
        if moe.shared is not None:
            total += sum(
                _lora_flops(tuple(getattr(moe.shared, n).weight.shape), rank) for n in arch.shared_expert_projections
            )
        shapes = arch.expert_shapes(moe.experts)
        total += top_k * sum(_lora_flops(shapes[n], rank) for n in arch.expert_projections)
    return total


def base_figures(model: nn.Module) -> dict:
    """Total and active parameters, forward FLOPs per token, weight bytes at 16 and 4 bits."""
    arch = architecture_for(model)
    num_experts, top_k = arch.num_experts(model.config), arch.top_k(model.config)
    routed = {id(p) for moe in arch.moe_layers(model) for p in moe.experts.parameters()}
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    head = output.weight if output is not None else None
    kept_16bit = {id(embedding)} | ({id(head)} if head is not None else set())
    total = active = bytes_nf4 = 0
    for param in model.parameters():  # each tensor once, tied ones included
        n = param.numel()
        total += n
        if param is not embedding:
            active += n * top_k / num_experts if id(param) in routed else n
        if param.dim() >= 2 and id(param) not in kept_16bit:
            bytes_nf4 += math.ceil(n / 2) + 4 * math.ceil(n / NF4_BLOCK)
        else:
            bytes_nf4 += 2 * n
    if head is not None and head is embedding:  # tied: the lm_head matmul still runs
        active += head.numel()
    active = round(active)
    return {
        "total_params": total,
        "active_params": active,
        "forward_flops": 2 * active,
        "bytes_16bit": 2 * total,
        "bytes_nf4": bytes_nf4,
    }


def check_ranks(model: nn.Module, plan: AdapterPlan) -> None:
    """Every LoRA rank at most the smaller side of the matrix it adapts (as injection will require)."""
    arch = architecture_for(model)
    attention = arch.attention_module(arch.decoder_layers(model)[0])
    for name in plan.attention_modules:
        _check(plan.rank, tuple(getattr(attention, name).weight.shape), f"attention {name}", "--rank")
    moe_layers = arch.moe_layers(model)
    if not moe_layers:
        return
    moe = moe_layers[0]
    if plan.router_rank is not None:
        _check(
            plan.router_rank,
            tuple(moe.router.weight.shape),
            "the router",
            "--router-rank",
            " (the router's rank defaults to --rank) or --no-router",
        )
    if moe.shared is not None:
        for name in plan.shared_expert_modules:
            _check(plan.rank, tuple(getattr(moe.shared, name).weight.shape), f"shared expert {name}", "--rank")
    if plan.expert_adapter == "lora":
        flag = "--rank-max" if plan.dynamic_rank is not None else "--rank"
        for name, shape in arch.expert_shapes(moe.experts).items():
            if name in plan.expert_modules:
                _check(plan.allocated_expert_rank, shape, f"expert {name}", flag)


def _check(rank: int, shape: tuple[int, int], where: str, flag: str, tail: str = "") -> None:
    try:
        check_rank(rank, shape, where)
    except ValueError:
        raise ValueError(
            f"Rank {rank} is larger than {where}'s smaller side ({shape[0]} x {shape[1]}); "
            f"choose {flag} <= {min(shape)}{tail}."
        ) from None


# -- the report ---------------------------------------------------------------------------


def _figure(value, unit: str, how: str, label: str) -> dict:
    if unit == "FLOPs/token":
        value = round(value)  # routing shares make fractions of a FLOP; ratios use the exact sums
    return {"label": label, "value": value, "unit": unit, "how": how}


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def budget(
    model: nn.Module,
    method: str = "lora",
    rank: int = 8,
    hot_k: int | None = None,
    router_rank: int | None = None,
    no_router: bool = False,
    profile: RoutingProfile | None = None,
    esft_coverage: float = 0.2,
    lori_density: float = 0.1,
    rank_max: int | None = None,
    source: str = "",
    profile_path: str | None = None,
    memory: MemorySettings | None = None,
) -> dict:
    """The budget report of `method` on `model` (a meta-device model is enough), as a dict.

    With `memory`, the report also holds the predicted peak memory of a training step
    (`hellora_pl.memory`) under its key "memory".
    """
    defaults = method_defaults(method)
    arch = architecture_for(model)
    num_experts, top_k = arch.num_experts(model.config), arch.top_k(model.config)
    moe_layers = arch.moe_layers(model)
    if rank < 1:
        raise ValueError(f"--rank must be at least 1, got {rank}.")
    if router_rank is not None and router_rank < 1:
        raise ValueError(f"--router-rank must be at least 1, got {router_rank}; use --no-router to freeze the router.")
    if not 0 < esft_coverage <= 1:
        raise ValueError(f"--esft-coverage must be in (0, 1], got {esft_coverage}.")
    if not 0 < lori_density <= 1:
        raise ValueError(f"--lori-density must be in (0, 1], got {lori_density}.")
    hot_k_given, hot_k = hot_k, top_k if hot_k is None else hot_k
    if method in HOT_K_METHODS and not 1 <= hot_k <= num_experts:
        raise ValueError(
            f"--hot-k {hot_k} is outside 1..{num_experts} (the model's experts per layer); choose one there."
        )
    rank_max = 2 * rank if rank_max is None else rank_max
    if defaults.dynamic_rank and rank_max < rank:
        raise ValueError(
            f"--rank-max {rank_max} is below --rank {rank}: DR-LoRA's ranks grow to fill r={rank}; "
            f"choose --rank-max >= {rank}."
        )

    if method in HOT_K_METHODS:
        policy = TopKPerLayer(k=hot_k)
    elif method == "esft":
        policy = CoveragePerLayer(coverage=esft_coverage, by="count")
    else:
        policy = defaults.policy()
    routing = profile if profile is not None else uniform_profile(model)
    if router_rank is not None and no_router:
        raise ValueError("Give --router-rank or --no-router, not both.")
    if no_router or (not defaults.router and router_rank is None):
        planned_router_rank = None
    else:
        planned_router_rank = rank if router_rank is None else router_rank
    lori = LoRISpec(lori_density, "model", masked=True) if defaults.lori else None
    dynamic = DynamicRankSpec.for_rank(rank, rank_max=rank_max) if defaults.dynamic_rank else None
    plan = build_plan(
        model,
        policy,
        routing,
        rank=rank,
        alpha=rank,
        router_rank=planned_router_rank,
        attention_modules=None if defaults.attention else [],
        shared_expert_modules=None if defaults.shared_experts else [],
        expert_modules=None if defaults.experts else [],
        method=method,
        expert_adapter=defaults.expert_adapter,
        lori=lori,
        dynamic_rank=dynamic,
    )
    check_ranks(model, plan)
    shares = selection_shares(routing)

    base = base_figures(model)
    lora_all_params = plan.lora_all_experts_params
    all_flops = lora_all_flops(model, rank)
    # DR-LoRA: build_plan starts every expert at rank_init (that is what plan.trainable_params
    # counts); at the end its ranks fill the budget of a uniform `rank` on the same experts.
    if dynamic is not None:
        start_params = plan.trainable_params
        trainable = count_plan_params(model, _with_expert_ranks(plan, rank))
        allocated = count_plan_params(model, _with_expert_ranks(plan, rank_max))
        flops = adapter_flops(model, plan, shares, expert_rank=rank)
        executed = adapter_flops(model, plan, shares, expert_rank=rank_max)
    else:
        trainable = plan.trainable_params
        dense = copy.deepcopy(plan)
        dense.lori = None  # every A and a dense B, as held in memory
        allocated = count_plan_params(model, dense)
        flops = adapter_flops(model, plan, shares)

    hot_per_layer = [len(layer.hot_experts) for layer in plan.layers]
    adapted_experts = sum(hot_per_layer)
    if profile is None:
        routing_desc = {
            "assumed": "uniform",
            "detail": f"no --profile: every expert takes 1/{num_experts} of each MoE layer's selections; "
            "hot-expert ties go to the lower index",
        }
    else:
        routing_desc = {
            "assumed": "profile",
            "detail": f"counts from {profile_path or 'a saved profile'} ({profile.tokens} profiled tokens)",
        }
    routing_desc["adapted_selection_share"] = flops["adapted_selection_share"]

    lora_how = "LoRA r(out+in) per adapted matrix"
    if defaults.expert_adapter == "full":
        trainable_how = "out x in per adapted expert matrix (full-rank deltas); " + lora_how + " elsewhere"
    elif lori is not None:
        trainable_how = f"LoRI: B only (A frozen), x density {lori_density}, r x out per adapted matrix"
    elif dynamic is not None:
        trainable_how = f"at the full budget: r={rank} on every adapted expert (= LoRA at r on those experts)"
    else:
        trainable_how = lora_how + "; gate_up fused as one [2I, H] matrix"
    expert_flops_how = "sum over adapted experts of P(e) x top_k x FLOPs per selection"
    if defaults.expert_adapter == "full":
        expert_flops_how += " (full rank: 2 in out per matrix)"
    elif lori is not None:
        expert_flops_how += " (LoRI counted with dense B: no sparse kernels)"
    elif dynamic is not None:
        expert_flops_how += f" (at the budget r={rank})"
    else:
        expert_flops_how += " (2 r (in + out) per matrix)"

    figures = {
        "trainable_params": _figure(trainable, "params", trainable_how, "trainable parameters"),
        "trainable_share_of_model": _figure(
            _ratio(trainable, base["total_params"]),
            "ratio",
            "trainable / base total parameters",
            "share of the model's parameters",
        ),
        "lora_all_params": _figure(
            lora_all_params,
            "params",
            f"LoRA r={rank} on attention, router, shared experts, every expert",
            "LoRA-on-all parameters",
        ),
        "trainable_vs_lora_all": _figure(
            _ratio(trainable, lora_all_params),
            "ratio",
            "trainable / LoRA-on-all at the same rank",
            "share of LoRA-on-all parameters",
        ),
        "adapter_params_allocated": _figure(
            allocated,
            "params",
            "every adapter tensor in memory (LoRI: A and dense B; DR-LoRA: r_max)",
            "adapter parameters allocated",
        ),
    }
    if dynamic is not None:
        figures["trainable_params_at_start"] = _figure(
            start_params,
            "params",
            f"every adapted expert at rank_init={dynamic.rank_init}",
            "trainable parameters at start",
        )
    figures.update(
        {
            "adapter_flops_attention": _figure(
                flops["attention"],
                "FLOPs/token",
                "2 r (in + out) per projection, every token",
                "adapter FLOPs: attention",
            ),
            "adapter_flops_router": _figure(
                flops["router"], "FLOPs/token", "2 r (E + H) per MoE layer, every token", "adapter FLOPs: router"
            ),
            "adapter_flops_shared_experts": _figure(
                flops["shared_experts"],
                "FLOPs/token",
                "2 r (in + out) per projection, every token",
                "adapter FLOPs: shared experts",
            ),
            "adapter_flops_experts": _figure(
                flops["experts"], "FLOPs/token", expert_flops_how, "adapter FLOPs: routed experts"
            ),
            "adapter_flops": _figure(flops["total"], "FLOPs/token", "forward, multiply-add = 2", "adapter FLOPs"),
        }
    )
    if dynamic is not None:
        figures["adapter_flops_executed"] = _figure(
            executed["total"],
            "FLOPs/token",
            f"as run: experts allocated at r_max={rank_max}, rank slices masked",
            "adapter FLOPs as executed",
        )
    figures.update(
        {
            "lora_all_adapter_flops": _figure(
                all_flops,
                "FLOPs/token",
                "LoRA-on-all; its expert term is top_k x FLOPs per selection",
                "LoRA-on-all adapter FLOPs",
            ),
            "adapter_flops_vs_lora_all": _figure(
                _ratio(flops["total"], all_flops),
                "ratio",
                "adapter FLOPs / LoRA-on-all adapter FLOPs",
                "adapter FLOPs vs LoRA-on-all",
            ),
            "adapted_selection_share": _figure(
                flops["adapted_selection_share"],
                "ratio",
                "routed selections landing on adapted experts (mean over layers)",
                "routed selections on adapted experts",
            ),
            "base_forward_flops": _figure(
                base["forward_flops"],
                "FLOPs/token",
                "2 x active params (top_k experts + shared; no input embedding)",
                "frozen base forward FLOPs",
            ),
            "adapter_flops_vs_base": _figure(
                _ratio(flops["total"], base["forward_flops"]),
                "ratio",
                "adapter FLOPs / frozen base forward FLOPs",
                "adapter overhead on the base forward",
            ),
            "total_params": _figure(base["total_params"], "params", "every base parameter once", "base parameters"),
            "active_params": _figure(
                base["active_params"],
                "params",
                "top_k of E routed experts, all else but the input embedding",
                "active parameters per token",
            ),
            "base_weight_bytes_16bit": _figure(
                base["bytes_16bit"], "bytes", "2 bytes per parameter", "base weights at 16 bits"
            ),
            "base_weight_bytes_nf4": _figure(
                base["bytes_nf4"],
                "bytes",
                "NF4: 0.5 B/weight + fp32 absmax per 64 (0.5625 B) for 2D+ weights; embeddings, lm_head, norms 16-bit",
                "base weights at 4 bits (NF4)",
            ),
        }
    )

    notes = []
    if lori is not None:
        notes.append(
            f"HELLoRI: trainable counts B's kept {lori_density:.0%} (mask in force); FLOPs use a dense B, "
            "as run without sparse kernels; A is frozen but held in memory."
        )
    if dynamic is not None:
        notes.append(
            f"DR-LoRA: build_plan starts each adapted expert at rank_init={dynamic.rank_init} "
            f"({start_params:,} trainable); ranks grow to fill a budget of r={rank} per expert "
            f"({plan.dynamic_rank.budget:,} rank units), so the figures are at that budget (equal to LoRA at r={rank}); "
            f"tensors are allocated at r_max={rank_max} and masked, so the forward as run costs the r_max figure."
        )
    if method in HOT_K_METHODS and profile is None:
        notes.append(
            "Under uniform routing the hot set is arbitrary (the lowest indices); give --profile for the "
            "experts a task actually uses and the FLOPs they take."
        )
    if method not in HOT_K_METHODS and hot_k_given is not None:
        notes.append(f"--hot-k applies to {' and '.join(HOT_K_METHODS)} only; ignored for {method}.")
    if planned_router_rank is not None and moe_layers:
        hidden = int(moe_layers[0].router.weight.shape[1])
        notes.append(
            "Router LoRA is counted per token as x A^T B^T; the implementation builds W + BA once per forward "
            f"(2 r E H FLOPs per MoE layer), which is less once a forward holds more than E H / (E + H) = "
            f"{num_experts * hidden // (num_experts + hidden)} tokens."
        )

    settings = {
        "rank": rank,
        "alpha": float(plan.alpha),
        "router_rank": planned_router_rank,
        "attention_modules": plan.attention_modules,
        "shared_expert_modules": plan.shared_expert_modules,
        "expert_modules": plan.expert_modules,
        "expert_adapter": plan.expert_adapter,
        "policy": plan.policy,
    }
    if method in HOT_K_METHODS:
        settings["hot_k"] = hot_k
    if lori is not None:
        settings["lori"] = {"density": lori.density, "granularity": lori.granularity, "masked": lori.masked}
    if dynamic is not None:
        spec = plan.dynamic_rank
        settings["dynamic_rank"] = {"rank_init": spec.rank_init, "rank_max": spec.rank_max, "budget": spec.budget}
    report = {
        "backbone": {
            "source": source,
            "model_type": model.config.model_type,
            "architecture": arch.name,
            "decoder_layers": len(arch.decoder_layers(model)),
            "moe_layers": len(moe_layers),
            "num_experts": num_experts,
            "top_k": top_k,
            "expert_shapes": {n: list(s) for n, s in arch.expert_shapes(moe_layers[0].experts).items()}
            if moe_layers
            else {},
        },
        "method": method,
        "summary": defaults.summary,
        "settings": settings,
        "routing": routing_desc,
        "adapted_experts": {
            "total": adapted_experts,
            "per_layer_min": min(hot_per_layer, default=0),
            "per_layer_max": max(hot_per_layer, default=0),
        },
        "figures": figures,
        "notes": notes,
    }
    if memory is not None:
        report["memory"] = memory_report(model, plan, shares, memory)
    return report


# -- printing -----------------------------------------------------------------------------


def _si(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:g}"


def _format_value(value, unit: str) -> str:
    if unit == "ratio":
        return f"{100 * value:.2f} %"
    if unit == "bytes":
        return f"{value / 2**30:.2f} GiB ({value:,} B)"
    if unit == "params":
        return f"{value:,} ({_si(value)}) params"
    if unit == "FLOPs/token":
        return f"{round(value):,} ({_si(value)}) FLOPs/token"
    return f"{value} {unit}"


def _names(names: list[str]) -> str:
    return ",".join(names) if names else "none"


def format_text(report: dict) -> str:
    b, s = report["backbone"], report["settings"]
    adapted = report["adapted_experts"]
    per_layer = (
        f"{adapted['per_layer_min']}"
        if adapted["per_layer_min"] == adapted["per_layer_max"]
        else f"{adapted['per_layer_min']}-{adapted['per_layer_max']}"
    )
    lines = [
        f"hellora_pl budget: {report['method']} on {b['source']}",
        f"  backbone   {b['model_type']}: {b['decoder_layers']} layers, {b['moe_layers']} MoE layers x "
        f"{b['num_experts']} experts, top-{b['top_k']}; expert matrices "
        + ", ".join(f"{n} {s_[0]}x{s_[1]}" for n, s_ in b["expert_shapes"].items()),
        f"  method     {report['summary']}",
        f"  adapters   rank {s['rank']} (alpha {s['alpha']:g}); attention {_names(s['attention_modules'])}; "
        f"router {'rank ' + str(s['router_rank']) if s['router_rank'] is not None else 'frozen'}; "
        f"shared experts {_names(s['shared_expert_modules'])}; experts {_names(s['expert_modules'])} "
        f"({s['expert_adapter']}) on {per_layer} per MoE layer, {adapted['total']} in all",
        "  policy     " + ", ".join(f"{k}={v}" for k, v in s["policy"].items()),
        f"  routing    {report['routing']['assumed']}: {report['routing']['detail']}",
        "",
    ]
    width = max(len(f["label"]) for f in report["figures"].values())
    values = {key: _format_value(f["value"], f["unit"]) for key, f in report["figures"].items()}
    value_width = max(len(v) for v in values.values())
    for key, fig in report["figures"].items():
        lines.append(f"  {fig['label']:<{width}}  {values[key]:>{value_width}}   {fig['how']}")
    if report["notes"]:
        lines.append("")
        lines.extend(f"  note: {note}" for note in report["notes"])
    lines.append("  (how each figure is counted: the docstring of hellora_pl/budget.py)")
    if "memory" in report:
        lines.extend(format_memory(report["memory"]))
    return "\n".join(lines)


def format_memory(memory: dict) -> list[str]:
    """The memory breakdown, one line per figure with how it is counted."""
    s = memory["settings"]
    lines = [
        "",
        f"  memory     per rank: batch {s['batch_size']} x {s['seq_len']} tokens; weights {s['dtype']}"
        f" ({s['quantization']}); adapters {s['adapter_dtype']}; gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}; FSDP ranks {s['fsdp']}",
    ]
    width = max(len(f["label"]) for f in memory["figures"].values())
    for fig in memory["figures"].values():
        value = f"{fig['value'] / 2**30:.2f} GiB ({fig['value'] / 1e9:.2f} GB)"
        lines.append(f"  {fig['label']:<{width}}  {value:>24}   {fig['how']}")
    lines.extend(f"  note: {note}" for note in memory["notes"])
    lines.append("  (how each memory term is counted: the docstring of hellora_pl/memory.py)")
    return lines


# -- command line -------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hellora_pl.budget",
        description="Trainable parameters, adapter FLOPs per token and base memory of a method on an MoE "
        "backbone, before any training. The counting rules are in this module's docstring.",
        allow_abbrev=False,
    )
    backbone = parser.add_mutually_exclusive_group(required=True)
    backbone.add_argument(
        "--shape", help=f"a built-in shape: {', '.join(n for n, s in SHAPES.items() if not s.remote_code)}"
    )
    backbone.add_argument("--config", help="a local config.json, or a directory holding one")
    backbone.add_argument("--model", help="a Hugging Face hub id (reads its config.json; needs the network)")
    parser.add_argument("--method", default="lora", choices=METHODS, help="default: lora")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8); alpha = rank")
    parser.add_argument(
        "--hot-k",
        type=int,
        default=None,
        help="hellora/hellori: hot experts per MoE layer (default: the model's routing top-k)",
    )
    parser.add_argument("--router-rank", type=int, default=None, help="router LoRA rank (default: --rank)")
    parser.add_argument("--no-router", action="store_true", help="leave the router frozen")
    parser.add_argument("--profile", default=None, help="a saved routing_profile.json (default: uniform routing)")
    parser.add_argument(
        "--esft-coverage",
        type=float,
        default=0.2,
        help="esft: share of each layer's selections its experts cover (default 0.2)",
    )
    parser.add_argument("--lori-density", type=float, default=0.1, help="hellori: kept share of B (default 0.1)")
    parser.add_argument(
        "--rank-max", type=int, default=None, help="dr_lora: largest per-expert rank (default 2 x rank)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_memory_arguments(parser)
    return parser


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory (with --memory; counting rules in hellora_pl/memory.py)")
    group.add_argument("--memory", action="store_true", help="add the predicted peak GPU memory of a training step")
    group.add_argument("--batch-size", type=int, default=1, help="sequences per rank (default 1)")
    group.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    group.add_argument("--dtype", default="bfloat16", help="base weights: bfloat16 (default), float16, float32")
    group.add_argument("--adapter-dtype", default="float32", help="adapters: float32 (default), bfloat16, float16")
    group.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="4-bit base (default none)")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute each decoder layer")
    group.add_argument("--fsdp", type=int, default=1, help="ranks sharing weights, grads and optimizer (default 1)")


def read_profile(path: str) -> RoutingProfile:
    try:
        return RoutingProfile.read(path)
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path!r} is not a saved routing profile ({type(exc).__name__}: {_one_line(exc, 200)}); give the "
            "routing_profile.json written by RoutingProfilerCallback or RoutingProfile.save."
        ) from None


def run(args: argparse.Namespace) -> dict:
    config, source = load_config(args.shape, args.config, args.model)
    architecture_for(config)
    model = meta_model(config)
    profile = read_profile(args.profile) if args.profile is not None else None
    return budget(
        model,
        method=args.method,
        rank=args.rank,
        hot_k=args.hot_k,
        router_rank=args.router_rank,
        no_router=args.no_router,
        profile=profile,
        esft_coverage=args.esft_coverage,
        lori_density=args.lori_density,
        rank_max=args.rank_max,
        source=source,
        profile_path=args.profile,
        memory=memory_settings(args) if args.memory else None,
    )


def memory_settings(args: argparse.Namespace) -> MemorySettings:
    return MemorySettings(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype,
        adapter_dtype=args.adapter_dtype,
        quantization=args.quantization,
        gradient_checkpointing=args.gradient_checkpointing,
        fsdp=args.fsdp,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"{parser.prog}: error: {_one_line(exc)}\n")
        raise SystemExit(2) from None
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return report


if __name__ == "__main__":
    main()
