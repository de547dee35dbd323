"""The liveness guard: one probe on a real batch proves every adapter can train and acts on the output.

`check_liveness(model, batch)` runs after injection, before the optimizer's first step
(`HotExpertInjectionCallback` calls it on the first training batch of every fit). Its checks:

1. **B = 0 equals the base.** With every B (and ESFT delta) zeroed, the adapted model's logits must
   equal those of the model's own eager experts path (transformers' code, the oracle) within
   1e-5 x max(1, |logits|) in fp32 (3e-2 x in 16-bit or under autocast). A post-expert norm, a bias
   or a transposed layout that the adapted expert path skips makes the output wrong, not the
   adapters dead; this is the check that catches it. It needs fused experts with plain tensors;
   ModuleList experts (their adapter adds exactly 0 when B = 0) and quantized storage are not compared.
2. **Every adapter tensor that trains gets a gradient.** B (and deltas) are set to a fixed
   non-constant pattern (B = 0 would leave A without gradient) and one forward and backward of
   mean(logits^2) runs. Every trainable tensor must get a nonzero gradient: LoRA's A and B,
   LoRI's B only (A is frozen), DR-LoRA's active slices (inactive ones are masked off, so a
   tensor counts as live when any of its entries gets one), ESFT's deltas. A routed site is checked
   per hot expert, and only for the hot experts the probe batch routed a token to: a hot expert
   no token reached is not dead (the batch did not need it); it is reported in `unreached`.
3. **Each kind of site changes the output.** With all B perturbed, zeroing one kind's B
   (attention, router, shared expert, routed experts) must change the logits. A kind that does not
   is then checked site by site. The gradient check already names a site whose output does not
   reach the loss; this one also catches an update computed outside autograd.

Nothing is trained: no optimizer step, every adapter tensor is restored exactly (copies taken
before), gradients are restored (the probe starts from none), and the model's training mode and
experts implementation come back. The probe runs in eval mode, so LoRA dropout and router jitter
draw no random numbers and do not blur the comparison; the perturbation is a fixed sin pattern.
Cost: a backward and 3-6 forwards on the batch (about three training steps), once per fit.

Under data-parallel or sharded training every rank runs the same sequence with its own batch:
routing counts and the per-kind verdicts are summed/maxed over ranks and sharded gradients are
gathered, so all ranks raise together. Only the single-process case is tested here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backbones import architecture_for
from ..kernels.dispatch import IMPLEMENTATIONS
from ..kernels.layout import ExpertLayout
from ..routing import RoutingRecorder
from .at_sites import adapters_at_sites
from .experts import ExpertAdapter, ExpertDelta
from .inject import adapter_state_dict, injected_plan
from .plan import AdapterPlan
from .sites import AdapterSite, adapter_sites

# Perturbation sizes: large enough to move bf16 logits well beyond rounding (about 10-20% of a
# projection's output on typical initialisations), small enough to keep the probe finite.
B_PERTURBATION = 0.05
DELTA_PERTURBATION = 0.01
FP32_TOLERANCE = 1e-5
LOW_PRECISION_TOLERANCE = 3e-2


class DeadAdapterError(RuntimeError):
    """An adapter site cannot train, or the adapted model does not compute what the base does."""


@dataclass
class LivenessReport:
    """What the probe ran and saw (for the log)."""

    sites: int
    forwards: int = 0
    backwards: int = 0
    base_difference: float | None = None  # B = 0 vs the eager experts path; None when not compared
    tolerance: float = FP32_TOLERANCE
    unreached: list[str] = field(default_factory=list)  # routed sites none of whose hot experts got a token
    masked_out: list[str] = field(default_factory=list)  # sites whose B LoRI's mask empties (nothing trains there)
    # routers whose weight the model's own routing gave no gradient on the probe batch (PhiMoE's sparsemixer
    # when one expert survives its mask): the router adapter is wired, and trains on batches where it does
    flat_routers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        base = "not compared"
        if self.base_difference is not None:
            base = f"{self.base_difference:.2g} (tol {self.tolerance:.0g})"
        text = (
            f"liveness: {self.sites} adapter sites live ({self.forwards} forwards, {self.backwards} backward, "
            f"{self.seconds:.2f} s); B = 0 vs the eager experts path: {base}"
        )
        if self.masked_out:
            text += f"; B fully masked by LoRI (nothing to train there): {', '.join(self.masked_out)}"
        if self.unreached:
            text += f"; hot experts no probe token reached (not checked): {', '.join(self.unreached)}"
        if self.flat_routers:
            text += (
                "; routers whose weight the model's routing gave no gradient on this batch (their adapters are wired "
                f"and train where it does): {', '.join(self.flat_routers)}"
            )
        return text


def check_liveness(model: nn.Module, batch: Mapping, plan: AdapterPlan | None = None) -> LivenessReport:
    """Probe `model` (injected with `plan`, default the plan injection recorded) on `batch`; raise
    DeadAdapterError naming every dead site and the likely reason. Leaves the model as it found it."""
    started = time.perf_counter()
    plan = plan if plan is not None else injected_plan(model)
    if plan is None:
        raise ValueError("check_liveness needs an injected model (inject_adapters records its plan) or plan=.")
    if "input_ids" not in batch:
        raise ValueError(f"The liveness probe needs a batch with input_ids; it has {sorted(batch)}.")
    sites = adapter_sites(model, plan)
    placed = adapters_at_sites(model, sites)
    report = LivenessReport(sites=len(sites))
    saved = {name: tensor.detach().clone() for name, tensor in adapter_state_dict(model).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in trainable]
    implementation = getattr(model.config, "_experts_implementation", None)
    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        for param in trainable:
            param.grad = None
        model.eval()
        with torch.random.fork_rng(devices=devices):
            _Probe(model, placed, _inputs(batch), report).run()
    finally:
        with torch.no_grad():
            tensors = adapter_state_dict(model)
            for name, value in saved.items():
                tensors[name].copy_(value)
        for param, grad in zip(trainable, grads, strict=True):
            param.grad = grad
        if getattr(model.config, "_experts_implementation", None) != implementation:
            model.set_experts_implementation(implementation)
        model.train(was_training)
    report.seconds = time.perf_counter() - started
    return report


def _inputs(batch: Mapping) -> dict:
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if batch.get(key) is not None}
    return {**inputs, "use_cache": False}


@dataclass
class _Dead:
    site: AdapterSite
    observed: str
    reason: str

    def line(self) -> str:
        return f"  - {self.site.where} ({self.site.path}): {self.observed}. Likely: {self.reason}"


class _Probe:
    def __init__(self, model: nn.Module, placed: Sequence[tuple[AdapterSite, nn.Module]], inputs: dict, report):
        self.model = model
        self.placed = placed
        self.inputs = inputs
        self.report = report
        self.arch = architecture_for(model)
        self.router_weight_grad: dict[int, bool] = {}  # id(router adapter) -> its effective weight got a gradient

    def run(self) -> None:
        self._set_updates(self.placed, zero=True)
        zero_logits = self._forward()
        self.report.tolerance = tolerance = self._tolerance(zero_logits)
        self._check_base(zero_logits, tolerance)
        self._set_updates(self.placed, zero=False)
        perturbed, reached = self._forward_backward()
        dead = self._dead_by_gradient(reached)
        dead += self._dead_by_output(perturbed, reached, tolerance, {id(d.site) for d in dead})
        if _any_rank(bool(dead), perturbed.device):
            raise DeadAdapterError(self._message(dead))

    def _message(self, dead: list[_Dead]) -> str:
        if not dead:
            return "Liveness guard: another rank found adapter sites that cannot train (see its error)."
        count = len({d.site.path for d in dead})
        return "\n".join(
            [
                f"Liveness guard: {count} of {self.report.sites} adapter sites cannot train (probe forward and "
                "backward on the first training batch, before any optimizer step):",
                *(d.line() for d in dead),
                "Nothing was trained: these adapters would stay frozen while being counted as trainable.",
            ]
        )

    # -- forwards -----------------------------------------------------------------------------
    def _forward(self) -> torch.Tensor:
        self.report.forwards += 1
        with torch.no_grad():
            return self.model(**self.inputs).logits.detach().float()

    def _forward_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.report.forwards += 1
        self.report.backwards += 1
        handles = [
            adapter.register_forward_hook(self._watch_router_weight)
            for site, adapter in self.placed
            if site.kind == "router"
        ]
        try:
            with RoutingRecorder(self.model) as recorder, torch.enable_grad():
                recorder.armed = True  # every token the experts saw, padding too: it gets gradient as well
                logits = self.model(**self.inputs).logits
                logits.float().square().mean().backward()
        finally:
            for handle in handles:
                handle.remove()
        return logits.detach().float(), _sum_over_ranks(recorder.counts, logits.device)

    def _watch_router_weight(self, adapter: nn.Module, inputs, weight: torch.Tensor) -> None:
        """Record whether the router's effective weight (base + BA, the parametrization's output) gets a
        gradient: none while the forward used it means the model's routing is flat there on this batch."""
        self.router_weight_grad.setdefault(id(adapter), False)
        if weight.requires_grad:
            weight.register_hook(lambda grad: self._note_router_grad(adapter, grad))

    def _note_router_grad(self, adapter: nn.Module, grad: torch.Tensor) -> None:
        self.router_weight_grad[id(adapter)] = self.router_weight_grad.get(id(adapter), False) or bool(grad.ne(0).any())

    def _tolerance(self, logits: torch.Tensor) -> float:
        device = logits.device.type
        low = torch.is_autocast_enabled(device) or any(
            p.dtype in (torch.bfloat16, torch.float16) for p in self.model.parameters() if p.is_floating_point()
        )
        return LOW_PRECISION_TOLERANCE if low else FP32_TOLERANCE

    @staticmethod
    def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))

    # -- check 1: B = 0 equals the model's own experts path ------------------------------------
    def _check_base(self, zero_logits: torch.Tensor, tolerance: float) -> None:
        if not self._eager_comparable():
            return
        current = self.model.config._experts_implementation
        self.model.set_experts_implementation("eager")
        try:
            eager_logits = self._forward()
        finally:
            self.model.set_experts_implementation(current)
        difference = self.report.base_difference = self._difference(zero_logits, eager_logits)
        if _any_rank(not difference <= tolerance, zero_logits.device):  # NaN fails too
            raise DeadAdapterError(
                "Liveness guard: with every adapter B (and delta) zeroed, the adapted model's logits differ from the "
                f"model's own eager experts path by {difference:.3g} (relative to max |logit|; tolerance "
                f"{tolerance:.0g}). The adapted expert path does not compute what this model computes, so training "
                f"would fit a different model. {self._layout_hint()} Nothing was trained; use a method without expert "
                "adapters (attention_only) or describe the layout so the expert path handles it."
            )

    def _eager_comparable(self) -> bool:
        """Fused experts with plain tensors, currently on hellora's adapted path (the base check's scope)."""
        if not self.arch.fused or self.model.config._experts_implementation not in IMPLEMENTATIONS.values():
            return False
        return all(
            isinstance(getattr(moe.experts, name, None), torch.Tensor)
            for moe in self.arch.moe_layers(self.model)
            for name in self.arch.expert_projections
        )

    def _layout_hint(self) -> str:
        """The experts' layout features beside the plain one (context for a failed base check)."""
        found: dict[str, list[int]] = {}
        for moe in self.arch.moe_layers(self.model):
            try:
                differences = ExpertLayout.of(moe.experts).differences()
            except NotImplementedError as refused:
                differences = [str(refused)]
            for text in differences:
                found.setdefault(text, []).append(moe.index)
        if not found:
            return "The experts use the plain layout: compare their forward with kernels/reference.py."
        listed = "; ".join(f"{text} (layers {layers})" for text, layers in found.items())
        return f"The experts declare: {listed}; compare how their forward applies these with kernels/reference.py."

    # -- check 2: every trainable adapter tensor gets a gradient -------------------------------
    def _dead_by_gradient(self, reached: torch.Tensor) -> list[_Dead]:
        rows = {layer: row for row, layer in enumerate(self.arch_layers())}
        dead = []
        for site, adapter in self.placed:
            if _masked_out(site, adapter):
                self.report.masked_out.append(site.path)
                continue
            if site.kind != "routed_expert":
                missing = [name for name, t in _token_tensors(adapter) if t.requires_grad and not _has_gradient(t)]
                if missing and self.router_weight_grad.get(id(adapter)) is False:
                    self.report.flat_routers.append(site.path)  # used by the forward, no gradient through routing
                    continue
                if missing:
                    dead.append(_Dead(site, f"no gradient reached {', '.join(missing)}", self._token_reason(site)))
                continue
            hits = reached[rows[site.layer]]
            kept = _kept_slots(site, adapter)
            slots = [s for s, e in enumerate(site.experts) if int(hits[e]) > 0 and s in kept]
            if not slots:
                self.report.unreached.append(site.path)
                continue
            missing = []
            for kind, tensor in _routed_tensors(adapter, site.name):
                grad = _full(tensor.grad) if tensor.requires_grad and tensor.grad is not None else None
                if not tensor.requires_grad:
                    continue
                for slot in slots:
                    if grad is None or not bool(grad[slot].ne(0).any()):
                        missing.append(f"{kind} of expert {site.experts[slot]}")
            if missing:
                listed = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
                observed = f"no gradient reached {listed} though the probe routed tokens there"
                dead.append(_Dead(site, observed, self._routed_reason(site)))
        return dead

    def arch_layers(self) -> list[int]:
        return [moe.index for moe in self.arch.moe_layers(self.model)]

    def _token_reason(self, site: AdapterSite) -> str:
        return (
            f"the model's forward does not use the {site.kind.replace('_', ' ')} module hellora wrapped at {site.path} "
            "(a replaced or bypassed module, or its output is detached); adapt another module or describe the "
            "architecture so its path names the module the forward calls."
        )

    def _routed_reason(self, site: AdapterSite) -> str:
        experts = self.model.get_submodule(site.module)
        implementation = getattr(self.model.config, "_experts_implementation", None)
        if not self.arch.fused:
            return "the experts of this layer do not call the wrapped per-expert linears (ExpertSlotLinear)."
        if not hasattr(experts, "has_post_expert_norm"):
            return (
                f"the experts of this layer ({type(experts).__name__}) did not run hellora's adapted expert path: the "
                "class lacks transformers' experts-interface seam (@use_experts_implementation), so setting the "
                "experts "
                f"implementation does nothing (it is {implementation!r}). Use a method without expert adapters "
                "(attention_only), or a transformers version whose experts class has the seam."
            )
        if implementation not in IMPLEMENTATIONS.values():
            return (
                f"the model's experts implementation is {implementation!r}, not hellora's adapted path; something "
                "reset "
                "it after injection (set_experts_implementation)."
            )
        return "the adapted expert path ran but its update does not reach the output (a kernel or layout bug)."

    # -- check 3: each kind of site changes the output -----------------------------------------
    def _dead_by_output(self, perturbed: torch.Tensor, reached: torch.Tensor, tol: float, known: set) -> list[_Dead]:
        rows = {layer: row for row, layer in enumerate(self.arch_layers())}
        kinds: dict[str, list] = {}
        for site, adapter in self.placed:
            if _masked_out(site, adapter):
                continue  # LoRI's mask keeps none of its B: zeroing it cannot change the output
            kept = _kept_slots(site, adapter)
            if site.kind == "routed_expert" and not any(
                int(reached[rows[site.layer]][e]) > 0 for s, e in enumerate(site.experts) if s in kept
            ):
                continue  # no token reached its hot (and unmasked) experts: zeroing it cannot change this output
            kinds.setdefault(site.kind, []).append((site, adapter))
        dead = []
        for group in kinds.values():
            if self._changes_output(group, perturbed, tol):
                continue
            for site, adapter in group:  # the kind is dead somewhere: site by site (one site: no new forward)
                if len(group) > 1 and self._changes_output([(site, adapter)], perturbed, tol):
                    continue  # the same forwards on every rank: `known` is this rank's only
                if id(site) not in known:
                    observed = "zeroing its B (or delta) leaves the logits unchanged"
                    dead.append(_Dead(site, observed, self._output_reason(site)))
        return dead

    def _changes_output(self, group, perturbed: torch.Tensor, tol: float) -> bool:
        self._set_updates(group, zero=True)
        try:
            difference = self._difference(self._forward(), perturbed)
        finally:
            self._set_updates(group, zero=False)
        return _any_rank(difference > tol, perturbed.device)

    def _output_reason(self, site: AdapterSite) -> str:
        if site.kind == "routed_expert":
            return self._routed_reason(site)
        return self._token_reason(site)

    # -- setting the updates --------------------------------------------------------------------
    @staticmethod
    def _set_updates(group, zero: bool) -> None:
        """B (LoRA) or the delta (ESFT) of each site's adapter: zero, or the fixed perturbation pattern."""
        with torch.no_grad():
            for site, adapter in group:
                for tensor, size in _update_tensors(site, adapter):
                    tensor.copy_(torch.zeros_like(tensor) if zero else _pattern(tensor, size))


def _b_mask(site: AdapterSite, adapter: nn.Module) -> torch.Tensor | None:
    """LoRI's mask on this site's B (None: no mask, every entry trains)."""
    if site.kind != "routed_expert":
        return getattr(adapter, "lora_B_mask", None)
    masks = getattr(adapter, "lora_B_mask", None)
    return None if masks is None else masks[site.name]


def _masked_out(site: AdapterSite, adapter: nn.Module) -> bool:
    """LoRI's mask keeps no entry of this site's B (model-wide masks can leave a small matrix empty):
    nothing there trains or acts, by design, so there is nothing to prove live."""
    mask = _b_mask(site, adapter)
    return mask is not None and not bool(mask.any())


def _kept_slots(site: AdapterSite, adapter: nn.Module) -> set[int]:
    """The hot-expert slots of a routed site whose B keeps at least one entry under LoRI's mask."""
    mask = _b_mask(site, adapter)
    if site.kind != "routed_expert" or mask is None:
        return set(range(len(site.experts)))
    return {slot for slot in range(len(site.experts)) if bool(mask[slot].any())}


def _token_tensors(adapter: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [("lora_A", adapter.lora_A), ("lora_B", adapter.lora_B)]


def _routed_tensors(adapter: ExpertAdapter, name: str) -> list[tuple[str, torch.Tensor]]:
    if isinstance(adapter, ExpertDelta):
        return [("delta", adapter.lora_delta[name])]
    return [("lora_A", adapter.lora_A[name]), ("lora_B", adapter.lora_B[name])]


def _update_tensors(site: AdapterSite, adapter: nn.Module) -> list[tuple[torch.Tensor, float]]:
    if site.kind != "routed_expert":
        return [(adapter.lora_B, B_PERTURBATION)]
    if isinstance(adapter, ExpertDelta):
        return [(adapter.lora_delta[site.name], DELTA_PERTURBATION)]
    return [(adapter.lora_B[site.name], B_PERTURBATION)]


def _pattern(tensor: torch.Tensor, size: float) -> torch.Tensor:
    """A fixed, sign-changing pattern (a constant B would shift every router logit alike, which softmax ignores)."""
    shape = tuple(tensor.shape)
    values = torch.arange(math.prod(shape), device=_local(tensor).device, dtype=torch.float32)
    values = (values.mul(0.7).add(0.3).sin() * size).reshape(shape).to(tensor.dtype)
    if hasattr(tensor, "device_mesh"):  # a sharded DTensor: the same global pattern, sharded like it
        from torch.distributed.tensor import distribute_tensor

        values = distribute_tensor(values, tensor.device_mesh, tensor.placements)
    return values


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every rank calls it in the same order)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _has_gradient(tensor: torch.Tensor) -> bool:
    return tensor.grad is not None and bool(_full(tensor.grad).ne(0).any())


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sum_over_ranks(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not _distributed():
        return counts
    total = counts.to(device)
    torch.distributed.all_reduce(total)
    return total.cpu()


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not _distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)
