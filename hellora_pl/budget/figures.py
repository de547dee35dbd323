"""The budget's figures as labelled entries (value, unit, how it is counted), and its notes."""

from __future__ import annotations

from ..adapters.plan import AdapterPlan
from .settings import HOT_K_METHODS


def figure(value, unit: str, how: str, label: str) -> dict:
    if unit == "FLOPs/token":
        value = round(value)  # routing shares make fractions of a FLOP; ratios use the exact sums
    return {"label": label, "value": value, "unit": unit, "how": how}


def ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _trainable_how(plan: AdapterPlan, rank: int) -> str:
    lora_how = "LoRA r(out+in) per adapted matrix"
    if plan.expert_adapter == "full":
        return "out x in per adapted expert matrix (full-rank deltas); " + lora_how + " elsewhere"
    if plan.lori is not None:
        return f"LoRI: B only (A frozen), x density {plan.lori.density}, r x out per adapted matrix"
    if plan.dynamic_rank is not None:
        return f"at the full budget: r={rank} on every adapted expert (= LoRA at r on those experts)"
    return lora_how + "; gate_up fused as one [2I, H] matrix"


def _expert_flops_how(plan: AdapterPlan, rank: int) -> str:
    how = "sum over adapted experts of P(e) x top_k x FLOPs per selection"
    if plan.expert_adapter == "full":
        return how + " (full rank: 2 in out per matrix)"
    if plan.lori is not None:
        return how + " (LoRI counted with dense B: no sparse kernels)"
    if plan.dynamic_rank is not None:
        return how + f" (at the budget r={rank})"
    return how + " (2 r (in + out) per matrix)"


def parameter_figures(plan: AdapterPlan, counts: dict, base: dict, rank: int) -> dict:
    """Trainable, allocated and LoRA-on-all parameters (DR-LoRA: and the count at the start)."""
    trainable, lora_all = counts["trainable"], counts["lora_all_params"]
    figures = {
        "trainable_params": figure(trainable, "params", _trainable_how(plan, rank), "trainable parameters"),
        "trainable_share_of_model": figure(
            ratio(trainable, base["total_params"]),
            "ratio",
            "trainable / base total parameters",
            "share of the model's parameters",
        ),
        "lora_all_params": figure(
            lora_all,
            "params",
            f"LoRA r={rank} on attention, router, shared experts, every expert",
            "LoRA-on-all parameters",
        ),
        "trainable_vs_lora_all": figure(
            ratio(trainable, lora_all),
            "ratio",
            "trainable / LoRA-on-all at the same rank",
            "share of LoRA-on-all parameters",
        ),
        "adapter_params_allocated": figure(
            counts["allocated"],
            "params",
            "every adapter tensor in memory (LoRI: A and dense B; DR-LoRA: r_max)",
            "adapter parameters allocated",
        ),
    }
    if plan.dynamic_rank is not None:
        figures["trainable_params_at_start"] = figure(
            counts["start"],
            "params",
            f"every adapted expert at rank_init={plan.dynamic_rank.rank_init}",
            "trainable parameters at start",
        )
    return figures


def flop_figures(plan: AdapterPlan, counts: dict, rank: int) -> dict:
    """Adapter FLOPs per token by part and in all (DR-LoRA: and as executed at r_max)."""
    flops = counts["flops"]
    every_token = "2 r (in + out) per projection, every token"
    figures = {
        "adapter_flops_attention": figure(flops["attention"], "FLOPs/token", every_token, "adapter FLOPs: attention"),
        "adapter_flops_router": figure(
            flops["router"], "FLOPs/token", "2 r (E + H) per MoE layer, every token", "adapter FLOPs: router"
        ),
        "adapter_flops_shared_experts": figure(
            flops["shared_experts"], "FLOPs/token", every_token, "adapter FLOPs: shared experts"
        ),
        "adapter_flops_experts": figure(
            flops["experts"], "FLOPs/token", _expert_flops_how(plan, rank), "adapter FLOPs: routed experts"
        ),
        "adapter_flops": figure(flops["total"], "FLOPs/token", "forward, multiply-add = 2", "adapter FLOPs"),
    }
    if plan.dynamic_rank is not None:
        figures["adapter_flops_executed"] = figure(
            counts["executed"]["total"],
            "FLOPs/token",
            f"as run: experts allocated at r_max={plan.dynamic_rank.rank_max}, rank slices masked",
            "adapter FLOPs as executed",
        )
    return figures


def comparison_figures(counts: dict, base: dict) -> dict:
    """Adapter FLOPs against LoRA-on-all and the frozen base, and the base model's own figures."""
    flops, all_flops = counts["flops"], counts["lora_all_flops"]
    figures = {
        "lora_all_adapter_flops": figure(
            all_flops, "FLOPs/token", "LoRA-on-all; its expert term is top_k x FLOPs per selection",
            "LoRA-on-all adapter FLOPs",
        ),
        "adapter_flops_vs_lora_all": figure(
            ratio(flops["total"], all_flops), "ratio", "adapter FLOPs / LoRA-on-all adapter FLOPs",
            "adapter FLOPs vs LoRA-on-all",
        ),
        "adapted_selection_share": figure(
            flops["adapted_selection_share"], "ratio",
            "routed selections landing on adapted experts (mean over layers)", "routed selections on adapted experts",
        ),
        "base_forward_flops": figure(
            base["forward_flops"], "FLOPs/token", "2 x active params (top_k experts + shared; no input embedding)",
            "frozen base forward FLOPs",
        ),
        "adapter_flops_vs_base": figure(
            ratio(flops["total"], base["forward_flops"]), "ratio", "adapter FLOPs / frozen base forward FLOPs",
            "adapter overhead on the base forward",
        ),
        "total_params": figure(base["total_params"], "params", "every base parameter once", "base parameters"),
        "active_params": figure(
            base["active_params"], "params", "top_k of E routed experts, all else but the input embedding",
            "active parameters per token",
        ),
        "base_weight_bytes_16bit": figure(
            base["bytes_16bit"], "bytes", "2 bytes per parameter", "base weights at 16 bits"
        ),
        "base_weight_bytes_nf4": figure(
            base["bytes_nf4"], "bytes",
            "NF4: 0.5 B/weight + fp32 absmax per 64 (0.5625 B) for the weights hellora_pl.quant stores in 4 bits "
            "(attention, routers, shared and routed experts); embeddings, lm_head, norms, dense MLPs 16-bit",
            "base weights at 4 bits (NF4)",
        ),
    }  # fmt: skip
    if base["bytes_nf4"] is None:  # a layout 4-bit storage does not handle (ModuleList experts)
        del figures["base_weight_bytes_nf4"]
    return figures


def notes(plan: AdapterPlan, counts: dict, rank: int, hot_k_given: int | None, profiled: bool, router: dict) -> list:
    """What a reader needs beside the figures: LoRI and DR-LoRA counting, uniform routing, router cost.

    `router`: {"experts": E, "hidden": H} of the first adapted router, or {} without router LoRA.
    """
    found = []
    if plan.lori is not None:
        found.append(
            f"HELLoRI: trainable counts B's kept {plan.lori.density:.0%} (mask in force); FLOPs use a dense B, "
            "as run without sparse kernels; A is frozen but held in memory."
        )
    if plan.dynamic_rank is not None:
        spec = plan.dynamic_rank
        found.append(
            f"DR-LoRA: build_plan starts each adapted expert at rank_init={spec.rank_init} "
            f"({counts['start']:,} trainable); ranks grow to fill a budget of r={rank} per expert "
            f"({spec.budget:,} rank units), so the figures are at that budget (equal to LoRA at r={rank}); "
            f"tensors are allocated at r_max={spec.rank_max} and masked, so the forward as run costs the r_max figure."
        )
    if plan.method in HOT_K_METHODS and not profiled:
        found.append(
            "Under uniform routing the hot set is arbitrary (the lowest indices); give --profile for the "
            "experts a task actually uses and the FLOPs they take."
        )
    if plan.method not in HOT_K_METHODS and hot_k_given is not None:
        found.append(f"--hot-k applies to {' and '.join(HOT_K_METHODS)} only; ignored for {plan.method}.")
    if plan.router_rank is not None and router:
        experts, hidden = router["experts"], router["hidden"]
        found.append(
            "Router LoRA is counted per token as x A^T B^T; the implementation builds W + BA once per forward "
            f"(2 r E H FLOPs per MoE layer), which is less once a forward holds more than E H / (E + H) = "
            f"{experts * hidden // (experts + hidden)} tokens."
        )
    return found
