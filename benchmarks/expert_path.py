"""One MoE experts layer, forward + backward, every way of adapting it side by side in one run.

Why: HELLoRA's promise is that adapting only the hot experts of a layer costs almost nothing over
the frozen base, while PEFT's LoRA on fused experts rebuilds W + BA for every expert on every
forward. This script measures exactly that layer (same input, routing and weights for every
variant), and first checks that the variants compute the same function where they should, since
a benchmark of wrong code is worthless.

    python benchmarks/expert_path.py                  # --shape cpu on CPU, olmoe on CUDA
    python benchmarks/expert_path.py --shape olmoe    # H 2048, I 1024, E 64, k 8 (GPU)
    python benchmarks/expert_path.py --shape mixtral  # H 4096, I 14336, E 8, k 2 (GPU)

Variants: the frozen base (transformers' grouped_mm, gradient w.r.t. the input only: the floor),
PEFT LoRA on all experts (`target_parameters`), ours with every expert hot (LoRA), ours with the
hot experts only (HELLoRA, torch path), and HELLoRA through the Triton kernel where CUDA and
`hellora_pl.kernels.triton_host` exist. The hot experts are the most often selected experts of
the benchmark's own routing, as HELLoRA chooses them from a routing profile; `--hot-share` biases
the router so that they take a given share of the (token, k) selections instead.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import torch
from _common import (
    RESULTS_DIR,
    Timed,
    fmt_mb,
    load_average,
    machine_info,
    machine_markdown,
    markdown_table,
    max_error,
    measure_memory,
    pick_device,
    text_table,
    time_interleaved,
    write_results,
)
from torch import nn
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeExperts

from hellora_pl.adapters.experts import EXPERT_ADAPTER_ATTR, ExpertLoRA, expert_adapter
from hellora_pl.kernels.layout import ExpertLayout
from hellora_pl.kernels.reference import ExpertRouting, _activate, adapted_experts_forward, grouped_mm, unsort_rows

PROJECTIONS = ("gate_up_proj", "down_proj")
LORA_SCALE = 2.0  # alpha / r with alpha = 2r, for ours and PEFT alike


@dataclass(frozen=True)
class ExpertShape:
    """One MoE layer: sizes, routing, adapter rank, number of hot experts, and token counts to run."""

    hidden: int
    intermediate: int
    experts: int
    top_k: int
    rank: int
    hot: int
    tokens: tuple[int, ...]
    note: str = ""


SHAPES: dict[str, ExpertShape] = {
    "tiny": ExpertShape(64, 32, 8, 2, 4, 2, (16,), "smoke test only"),
    "cpu": ExpertShape(512, 256, 64, 8, 8, 8, (256, 64, 512), "OLMoE-like, scaled down for a CPU"),
    "olmoe": ExpertShape(2048, 1024, 64, 8, 32, 8, (4096,), "OLMoE-1B-7B layer; hot = top-k = 8 of 64"),
    # Mixtral routes top-2 of 8: HELLoRA's default policy adapts the top-k (here 2) most selected
    # experts, a quarter of the layer, so the saving is smaller than on OLMoE by construction.
    "mixtral": ExpertShape(4096, 14336, 8, 2, 32, 2, (4096,), "Mixtral-8x7B layer; hot = top-k = 2 of 8"),
}

TARGETS = {
    "shape": "cpu",
    "tokens": 256,
    "hellora_over_base_at_most": 1.15,
    "peft_over_hellora_at_least": 2.5,
}


# -- the layer, its routing and its adapters -----------------------------------------------


def make_experts(shape: ExpertShape, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A frozen fused experts module (transformers' OLMoE layout) with random N(0, 0.02) weights."""
    config = OlmoeConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
    )
    config._experts_implementation = "grouped_mm"
    with torch.device(device):
        experts = OlmoeExperts(config).to(dtype)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name in PROJECTIONS:
            getattr(experts, name).normal_(0, 0.02, generator=generator)
    return experts.requires_grad_(False)


@dataclass
class Routing:
    index: torch.Tensor  # [T, k]
    weights: torch.Tensor  # [T, k]
    hot_experts: list[int]
    hot_share: float  # share of the (token, k) selections routed to the hot experts


def make_routing(
    tokens: int, shape: ExpertShape, hot_share: float | None, seed: int, device: torch.device, dtype: torch.dtype
) -> Routing:
    """Random router logits, softmax then top-k (OLMoE's router); hot = the most selected experts.

    With `hot_share`, `shape.hot` random experts get a logit bias found by bisection so that they
    take about that share of the selections (real routers are skewed; i.i.d. logits are not).
    """
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, shape.experts, generator=generator)
    if hot_share is not None:
        favoured = torch.randperm(shape.experts, generator=generator)[: shape.hot]
        logits[:, favoured] += _bias_for_share(logits, favoured, shape.top_k, hot_share)
    weights, index = torch.topk(logits.softmax(-1), shape.top_k, dim=-1)
    counts = torch.bincount(index.reshape(-1), minlength=shape.experts)
    hot = sorted(torch.sort(-counts.double(), stable=True).indices[: shape.hot].tolist())
    share = counts[hot].sum().item() / counts.sum().item()
    return Routing(index.to(device), weights.to(device, dtype), hot, share)


def _bias_for_share(logits: torch.Tensor, favoured: torch.Tensor, top_k: int, share: float) -> float:
    def share_at(bias: float) -> float:
        biased = logits.clone()
        biased[:, favoured] += bias
        index = biased.topk(top_k, dim=-1).indices
        return torch.isin(index, favoured).float().mean().item()

    low, high = 0.0, 30.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if share_at(middle) < share else (low, middle)
    return (low + high) / 2


def make_lora(experts: nn.Module, hot: Sequence[int], rank: int, seed: int) -> ExpertLoRA:
    """Our expert adapter on `hot`, B non-zero (a zero B would hide a wrong update from the checks)."""
    weight = experts.gate_up_proj
    shapes = {name: tuple(getattr(experts, name).shape[1:]) for name in PROJECTIONS}
    torch.manual_seed(seed)
    lora = ExpertLoRA(shapes, weight.shape[0], hot, rank, LORA_SCALE, device=weight.device, dtype=torch.float32)
    with torch.no_grad():
        for name in PROJECTIONS:
            lora.lora_B[name].normal_(0, 0.05)
    return lora


@contextlib.contextmanager
def attached(experts: nn.Module, lora: ExpertLoRA | None):
    """Our adapter on the shared experts module for the duration of one call."""
    if lora is not None:
        setattr(experts, EXPERT_ADAPTER_ATTR, lora)
    try:
        yield
    finally:
        if lora is not None:
            delattr(experts, EXPERT_ADAPTER_ATTR)


def make_peft(experts: nn.Module, rank: int) -> nn.Module:
    """PEFT 0.21 LoRA on every expert of the layer, through `target_parameters` (its only way in)."""
    box = nn.Module()
    box.experts = experts
    config = peft.LoraConfig(
        target_parameters=[f"experts.{name}" for name in PROJECTIONS], r=rank, lora_alpha=LORA_SCALE * rank
    )
    return peft.inject_adapter_in_model(config, box)


def peft_wrappers(box: nn.Module) -> dict[str, nn.Module]:
    return {m.parameter_name: m for m in box.modules() if isinstance(m, peft.tuners.lora.ParamWrapper)}


def load_into_peft(box: nn.Module, lora: ExpertLoRA) -> None:
    """Write our A and B into PEFT's layout: A (E, r, in) expert slowest, B (out, r, E) expert fastest;
    experts our adapter does not hold get zero A and B."""
    hot = lora.hot_experts
    with torch.no_grad():
        for name, wrapper in peft_wrappers(box).items():
            peft_a, peft_b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
            a = peft_a.new_zeros(lora.num_experts, lora.rank, peft_a.shape[1])
            b = peft_b.new_zeros(peft_b.shape[0], lora.rank, lora.num_experts)
            a[hot] = lora.lora_A[name].to(a.dtype)
            b[:, :, hot] = lora.effective_B(name).permute(1, 2, 0).to(b.dtype)
            peft_a.copy_(a.reshape_as(peft_a))
            peft_b.copy_(b.reshape_as(peft_b))


def peft_grads_as_ours(lora: ExpertLoRA, grads: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """PEFT's gradients of A and B, cut to our hot experts and laid out as our lora_A / lora_B."""
    hot, out = lora.hot_experts, []
    for name in PROJECTIONS:
        grad_a, grad_b = grads[f"{name}.A"], grads[f"{name}.B"]
        out.append(grad_a.view(lora.num_experts, lora.rank, -1)[hot])
        out.append(grad_b.view(grad_b.shape[0], lora.rank, lora.num_experts)[:, :, hot].permute(2, 0, 1))
    return out


def peft_params(box: nn.Module) -> dict[str, torch.Tensor]:
    params = {}
    for name, wrapper in peft_wrappers(box).items():
        params[f"{name}.A"] = wrapper.lora_A["default"].weight
        params[f"{name}.B"] = wrapper.lora_B["default"].weight
    return params


def ours_params(lora: ExpertLoRA) -> list[torch.Tensor]:
    return [p for name in PROJECTIONS for p in (lora.lora_A[name], lora.lora_B[name])]


# -- a prototype of a change to hellora_pl/kernels/reference.py (measured here, not shipped) ------


class _HotLoRAProjection(torch.autograd.Function):
    """A frozen grouped projection plus the hot rows' LoRA, with a hand-written backward.

    Forward adds the update into the base output in place. Backward computes dx, dA and dB only
    and adds the hot rows' dx into the base dx in place: autograd's version builds a full-size
    zero dx for the hot-row gather, scatters into it, then adds it to the base dx.
    """

    @staticmethod
    def forward(ctx, x, weight, a, b, offsets, hot_rows, hot_offsets, scale):
        out = grouped_mm(x, weight.transpose(-2, -1), offsets)
        x_hot = x[hot_rows].to(a.dtype)
        shrunk = grouped_mm(x_hot, a.transpose(-2, -1), hot_offsets)
        update = grouped_mm(shrunk, b.transpose(-2, -1), hot_offsets)
        out.index_add_(0, hot_rows, update.to(out.dtype), alpha=scale)
        ctx.save_for_backward(weight, a, b, offsets, hot_rows, hot_offsets, x_hot, shrunk)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, a, b, offsets, hot_rows, hot_offsets, x_hot, shrunk = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grouped_mm(grad_out, weight, offsets) if ctx.needs_input_grad[0] else None
        grad_hot = grad_out[hot_rows].to(a.dtype) * ctx.scale
        grad_b = grouped_mm(grad_hot.t(), shrunk, hot_offsets)  # [n_hot, out, r]
        grad_shrunk = grouped_mm(grad_hot, b, hot_offsets)  # [hot rows, r]
        grad_a = grouped_mm(grad_shrunk.t(), x_hot, hot_offsets)  # [n_hot, r, in]
        if grad_x is not None:
            grad_x.index_add_(0, hot_rows, grouped_mm(grad_shrunk, a, hot_offsets).to(grad_x.dtype))
        return grad_x, None, grad_a, grad_b, None, None, None, None


def hand_written_backward_forward(experts, hidden_states, top_k_index, top_k_weights):
    """The reference expert path with each adapted projection's backward written by hand
    (`_HotLoRAProjection`); everything else is the reference's own pieces."""
    lora = expert_adapter(experts)
    num_tokens, top_k = top_k_index.shape
    routing = ExpertRouting.build(top_k_index, experts.gate_up_proj.shape[0], lora)

    def project(name: str, x: torch.Tensor) -> torch.Tensor:
        weight = getattr(experts, name)
        x = x.to(weight.dtype)
        if lora is None or name not in lora.projections or routing.hot_rows.numel() == 0:
            return grouped_mm(x, weight.transpose(-2, -1), routing.offsets)
        a, b = lora.lora_A[name], lora.effective_B(name)
        assert (a.shape[1] * a.element_size()) % 16 == 0, "the prototype does not pad the rank"
        args = (routing.offsets, routing.hot_rows, routing.hot_offsets, lora.scale)
        return _HotLoRAProjection.apply(x, weight, a, b, *args)

    hidden = _activate(experts, ExpertLayout.of(experts), project("gate_up_proj", hidden_states[routing.token_of_row]))
    out = project("down_proj", hidden)
    out = out * top_k_weights.reshape(-1)[routing.perm].unsqueeze(-1).to(out.dtype)
    return unsort_rows(out, routing.perm).view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


# The unsort-by-gather and in-place LoRA add measured here earlier now ship in the reference.
PROTOTYPES = {"proto HELLoRA: hand-written LoRA backward": hand_written_backward_forward}


# -- variants ------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor] | None  # None: cannot run here
    params: list[torch.Tensor]
    why_not: str = ""


def triton_forward(device: torch.device) -> tuple[Callable | None, str]:
    """The Triton HELLoRA path, imported lazily: it needs CUDA and the (new) triton_host module."""
    if device.type != "cuda":
        return None, "n/a (no CUDA)"
    try:
        from hellora_pl.kernels.triton_host import triton_adapted_experts_forward
    except ImportError as error:
        return None, f"n/a (no triton_adapted_experts_forward: {error})"
    return triton_adapted_experts_forward, ""


def ours(forward: Callable, experts: nn.Module, lora: ExpertLoRA | None, routing: Routing):
    def run(x: torch.Tensor) -> torch.Tensor:
        with attached(experts, lora):
            return forward(experts, x, routing.index, routing.weights)

    return run


def build_variants(experts, box, lora_all, lora_hot, routing, device, prototypes: bool) -> list[Variant]:
    triton, why_not = triton_forward(device)
    hot_params, peft_list = ours_params(lora_hot), list(peft_params(box).values())
    variants = [
        Variant("frozen base (grouped_mm)", lambda x: experts(x, routing.index, routing.weights), []),
        Variant("PEFT LoRA, all experts", lambda x: box.experts(x, routing.index, routing.weights), peft_list),
        Variant(
            "ours LoRA, all experts", ours(adapted_experts_forward, experts, lora_all, routing), ours_params(lora_all)
        ),
        Variant(
            "ours HELLoRA, hot only (torch)", ours(adapted_experts_forward, experts, lora_hot, routing), hot_params
        ),
        Variant(
            "ours HELLoRA, hot only (Triton)",
            None if triton is None else ours(triton, experts, lora_hot, routing),
            hot_params,
            why_not,
        ),
        Variant("ours path, no adapter (info)", ours(adapted_experts_forward, experts, None, routing), []),
    ]
    if prototypes:
        variants += [Variant(name, ours(fn, experts, lora_hot, routing), hot_params) for name, fn in PROTOTYPES.items()]
    return variants


# -- correctness ---------------------------------------------------------------------------


def forward_backward(forward, hidden, grad_out, params: Sequence[torch.Tensor]):
    x = hidden.detach().requires_grad_(True)
    out = forward(x)
    grads = torch.autograd.grad(out, [x, *params], grad_out)
    return out.detach(), list(grads)


def compare(name: str, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], tol: float, extra=None) -> dict:
    errors = {key: max_error(got, want)[1] for key, (got, want) in pairs.items()}
    passed = all(math.isfinite(e) and e <= tol for e in errors.values())
    check = {"name": name, "passed": passed, "tolerance_rel": tol, "max_rel_error": errors}
    if extra:
        check.update(extra)
        passed = passed and extra.get("passed", True)
        check["passed"] = passed
    return check


def run_checks(experts, box, lora_all, lora_hot, routing, hidden, grad_out, tol, triton, prototypes) -> list[dict]:
    """The variants that should agree do: ours vs transformers, ours vs PEFT (B != 0), Triton vs torch."""
    checks = []
    base_out, (base_dx,) = forward_backward(lambda x: experts(x, routing.index, routing.weights), hidden, grad_out, [])
    path_out, (path_dx,) = forward_backward(ours(adapted_experts_forward, experts, None, routing), hidden, grad_out, [])
    checks.append(
        compare(
            "ours path without adapter == transformers grouped_mm",
            {"out": (path_out, base_out), "dx": (path_dx, base_dx)},
            tol,
        )
    )
    for label, lora in (("LoRA, all experts", lora_all), ("HELLoRA, hot only", lora_hot)):
        load_into_peft(box, lora)
        params = peft_params(box)
        peft_out, peft_grads = forward_backward(
            lambda x: box.experts(x, routing.index, routing.weights), hidden, grad_out, list(params.values())
        )
        peft_dx, peft_grad_map = peft_grads[0], dict(zip(params, peft_grads[1:]))
        our_out, our_grads = forward_backward(
            ours(adapted_experts_forward, experts, lora, routing), hidden, grad_out, ours_params(lora)
        )
        pairs = {"out": (our_out, peft_out), "dx": (our_grads[0], peft_dx)}
        names = [f"{n}.{ab}" for n in PROJECTIONS for ab in ("dA", "dB")]
        pairs.update(zip(names, zip(our_grads[1:], peft_grads_as_ours(lora, peft_grad_map))))
        effect = max_error(our_out, base_out)[1]  # the adapter must matter, or equality proves nothing
        extra = {"adapter_effect_rel": effect, "passed": effect > 100 * tol}
        checks.append(compare(f"ours {label} == PEFT with the same A, B (cold experts zero)", pairs, tol, extra))
        if lora is not lora_hot:
            continue
        others = {"ours HELLoRA Triton": triton} if triton is not None else {}
        if prototypes:
            others.update(PROTOTYPES)
        for other, forward in others.items():
            got_out, got_grads = forward_backward(
                ours(forward, experts, lora, routing), hidden, grad_out, ours_params(lora)
            )
            other_pairs = {"out": (got_out, our_out), "dx": (got_grads[0], our_grads[0])}
            other_pairs.update(zip(names, zip(got_grads[1:], our_grads[1:])))
            checks.append(compare(f"{other} == torch reference HELLoRA", other_pairs, tol))
    load_into_peft(box, lora_all)  # PEFT is timed as LoRA on all experts
    return checks


# -- the run -------------------------------------------------------------------------------


def run_tokens(args, shape: ExpertShape, tokens: int, experts, box, device, dtype) -> tuple[list[dict], list[dict]]:
    routing = make_routing(tokens, shape, args.hot_share, args.seed + tokens, device, dtype)
    lora_all = make_lora(experts, range(shape.experts), shape.rank, args.seed)
    lora_hot = make_lora(experts, routing.hot_experts, shape.rank, args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    hidden = torch.randn(tokens, shape.hidden, generator=generator).to(device, dtype)
    grad_out = torch.randn(tokens, shape.hidden, generator=generator).to(device, dtype)
    variants = build_variants(experts, box, lora_all, lora_hot, routing, device, args.prototypes)
    triton = triton_forward(device)[0]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    checks = run_checks(experts, box, lora_all, lora_hot, routing, hidden, grad_out, tol, triton, args.prototypes)
    for check in checks:
        check["tokens"] = tokens

    def step_of(variant: Variant) -> Callable[[], None]:
        def step() -> None:
            for p in variant.params:
                p.grad = None
            x = hidden.detach().requires_grad_(True)
            variant.forward(x).backward(grad_out)

        return step

    runnable = [v for v in variants if v.forward is not None]
    timed = [Timed(v.name, step_of(v)) for v in runnable]
    time_interleaved(timed, device, args.warmup, args.repeats)
    exclude = [hidden, grad_out, routing.index, routing.weights, *experts.parameters()]
    exclude += [*box.parameters(), *lora_all.parameters(), *lora_hot.parameters()]
    memory = {v.name: measure_memory(step_of(v), device, exclude) for v in runnable}
    base = timed[0]
    rows = []
    for variant in variants:
        row = {"tokens": tokens, "variant": variant.name, "hot_experts": len(routing.hot_experts)}
        row["hot_share"] = round(routing.hot_share, 4)
        found = next((t for t in timed if t.name == variant.name), None)
        if found is None:
            rows.append({**row, "status": variant.why_not})
            continue
        row.update(
            status="ok",
            ms_median=round(found.median_ms, 3),
            ms_min=round(found.min_ms, 3),
            tokens_per_s=round(tokens / (found.median_ms / 1e3), 1),
            ratio_to_base=round(found.median_ms / base.median_ms, 3),
            ratio_to_base_min=round(found.min_ms / base.min_ms, 3),
            samples_ms=[round(1e3 * s, 3) for s in found.samples],
            **memory[variant.name],
        )
        rows.append(row)
    return rows, checks


def targets_report(rows: list[dict], shape_name: str) -> dict | None:
    if shape_name != TARGETS["shape"]:
        return None
    at = {r["variant"]: r for r in rows if r["tokens"] == TARGETS["tokens"] and r["status"] == "ok"}
    hellora, peft_row = at.get("ours HELLoRA, hot only (torch)"), at.get("PEFT LoRA, all experts")
    if hellora is None or peft_row is None:
        return None
    peft_over = peft_row["ms_median"] / hellora["ms_median"]
    return {
        **TARGETS,
        "hellora_over_base": hellora["ratio_to_base"],
        "hellora_over_base_met": hellora["ratio_to_base"] <= TARGETS["hellora_over_base_at_most"],
        "peft_over_hellora": round(peft_over, 3),
        "peft_over_hellora_met": peft_over >= TARGETS["peft_over_hellora_at_least"],
    }


HEADERS = [
    "tokens",
    "variant",
    "ms fwd+bwd (median)",
    "ms (min)",
    "tokens/s",
    "memory MB",
    "x base (median)",
    "x base (min)",
]


def table_rows(rows: list[dict], device: torch.device) -> list[list]:
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append([r["tokens"], r["variant"], r["status"], "", "", "", "", ""])
            continue
        memory = f"saved {fmt_mb(r['saved_bytes'])}"
        if device.type == "cuda":
            memory += f", peak {fmt_mb(r['peak_bytes'])}"
        out.append(
            [r["tokens"], r["variant"], f"{r['ms_median']:.2f}", f"{r['ms_min']:.2f}", f"{r['tokens_per_s']:.0f}",
             memory, f"{r['ratio_to_base']:.2f}", f"{r['ratio_to_base_min']:.2f}"]
        )  # fmt: skip
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: cpu on CPU, olmoe on CUDA")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: fp32 CPU, bf16 CUDA")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default: the shape's)")
    parser.add_argument("--hot-share", type=float, default=None, help="bias routing so hot experts take this share")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--prototypes", action="store_true", help="add rows for changes proposed to kernels/reference.py"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 1 warmup, 1 repeat (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and markdown files")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.warmup, args.repeats = args.shape or "tiny", 1, 1
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    load_at_start = load_average()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    shape_name = args.shape or ("olmoe" if device.type == "cuda" else "cpu")
    shape = SHAPES[shape_name]
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tokens = args.tokens or list(shape.tokens)
    experts = make_experts(shape, device, dtype, args.seed)
    box = make_peft(experts, shape.rank)
    rows, checks = [], []
    for count in tokens:
        new_rows, new_checks = run_tokens(args, shape, count, experts, box, device, dtype)
        rows += new_rows
        checks += new_checks
        print(text_table(HEADERS, table_rows(new_rows, device)), flush=True)
    info = machine_info(device, __file__, argv, load_at_start)
    targets = targets_report(rows, shape_name)
    payload = {
        "benchmark": "expert_path",
        "shape_name": shape_name,
        "shape": asdict(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "hot_share_arg": args.hot_share,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "machine": info,
        "rows": rows,
        "checks": checks,
        "all_checks_passed": all(c["passed"] for c in checks),
        "targets": targets,
    }
    print("\ncorrectness:")
    for check in checks:
        print(f"  [{'PASS' if check['passed'] else 'FAIL'}] T={check['tokens']} {check['name']}: max rel error "
              + ", ".join(f"{k} {v:.1e}" for k, v in check["max_rel_error"].items()))  # fmt: skip
    if targets:
        print(f"\ntargets at T={targets['tokens']}: HELLoRA {targets['hellora_over_base']:.2f}x base "
              f"(<= {targets['hellora_over_base_at_most']}: {targets['hellora_over_base_met']}), PEFT "
              f"{targets['peft_over_hellora']:.2f}x HELLoRA (>= {targets['peft_over_hellora_at_least']}: "
              f"{targets['peft_over_hellora_met']})")  # fmt: skip
    stem = f"expert_path_{shape_name}_{device.type}"
    if args.hot_share is not None:
        stem += f"_share{args.hot_share:g}"
    if args.threads is not None:
        stem += f"_threads{args.threads}"
    json_path, md_path = write_results(args.out, stem, payload, render_markdown(payload, device))
    print(f"\nwrote {json_path} and {md_path}")
    return payload


def routing_note(hot_share: float | None) -> str:
    if hot_share is None:
        return "Routing: i.i.d. random router logits, softmax, top-k; hot = the most selected experts"
    return f"Routing: random logits biased so that the hot experts take about {hot_share:g} of the selections"


def render_markdown(payload: dict, device: torch.device) -> str:
    shape = payload["shape"]
    lines = [
        f"# Expert path: one MoE layer, forward + backward ({payload['shape_name']}, {device.type})",
        "",
        f"H {shape['hidden']}, I {shape['intermediate']}, E {shape['experts']}, top-{shape['top_k']}, "
        f"r {shape['rank']}, {shape['hot']} hot experts, {payload['dtype']}; {shape['note']}. "
        f"Median and min of {payload['repeats']} interleaved repeats after {payload['warmup']} warmup. "
        "Memory: bytes autograd saves for backward beyond inputs and parameters"
        + (" (CPU has no allocator statistics)" if device.type == "cpu" else ", and the CUDA peak above the start")
        + f". {routing_note(payload['hot_share_arg'])} (the hot share column). Ratios are to the frozen base; "
        "the `proto` rows are changes proposed for hellora_pl/kernels/reference.py, measured here, not shipped.",
        "",
        markdown_table(HEADERS + ["hot share"], [row + [r.get("hot_share", "")] for row, r in
                                                 zip(table_rows(payload["rows"], device), payload["rows"])]),
        "",
        "## Correctness",
        "",
    ]  # fmt: skip
    for check in payload["checks"]:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in check["max_rel_error"].items())
        lines.append(f"- {'PASS' if check['passed'] else 'FAIL'} (T={check['tokens']}) {check['name']}: {errors}")
    if payload["targets"]:
        t = payload["targets"]
        lines += [
            "",
            "## Targets",
            "",
            f"{routing_note(payload['hot_share_arg'])}.",
            "",
            f"- HELLoRA fwd+bwd at most {t['hellora_over_base_at_most']}x the frozen base at {t['tokens']} tokens: "
            f"{t['hellora_over_base']:.2f}x, {'met' if t['hellora_over_base_met'] else 'NOT met'}",
            f"- PEFT LoRA on all experts at least {t['peft_over_hellora_at_least']}x slower than HELLoRA: "
            f"{t['peft_over_hellora']:.2f}x, {'met' if t['peft_over_hellora_met'] else 'NOT met'}",
        ]
    lines += ["", "## Machine", "", machine_markdown(payload["machine"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
