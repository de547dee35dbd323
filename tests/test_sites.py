"""`adapter_sites` is the one list of a plan's adapters: injection, parameter counts, FLOPs, the memory
estimate, merge and export all agree with it, on every tiny family (fused and ModuleList experts,
shared experts, latent attention) and every method."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hellora_pl.adapters import (
    DynamicRankSpec,
    LoRISpec,
    adapter_modules,
    adapter_sites,
    adapter_state_dict,
    inject_adapters,
    merge_adapters,
)
from hellora_pl.adapters.experts import ExpertDelta, ExpertSlotLinear, layer_expert_adapter
from hellora_pl.adapters.export import PEFT_CONFIG_FILE, export_peft
from hellora_pl.adapters.linear import LoRALinear
from hellora_pl.adapters.methods import resolve_method
from hellora_pl.adapters.plan import METHODS
from hellora_pl.adapters.router import router_lora
from hellora_pl.adapters.sites import (
    adapter_flops,
    allocated_elements,
    gradient_elements,
    trainable_params,
    with_expert_rank,
)
from hellora_pl.backbones import architecture_for
from hellora_pl.backbones.tiny import TINY_CONFIGS, tiny_backbone_config
from hellora_pl.loading import load_backbone
from hellora_pl.memory import MemorySettings, memory_report
from hellora_pl.routing import RoutingRecorder

RANK = 4
SPECS = {
    "hellori": {"lori": LoRISpec(0.5, "model", masked=True)},  # masked: B counts at its kept share
    "dr_lora": {"dynamic_rank": DynamicRankSpec(rank_init=2, rank_max=8)},
}
CASES = [(family, method) for family in TINY_CONFIGS for method in METHODS]


def batch(vocab: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 8), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}  # no padding: every token is routed


def adapted(family: str, method: str):
    """(base state dict, injected model, plan, sites, routing profile of the batch, batch)."""
    model = load_backbone(tiny_backbone_config(family))
    tokens = batch(TINY_CONFIGS[family][1]["vocab_size"])
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.armed = True
        model(**tokens)
    profile = recorder.profile()
    plan = resolve_method(method, rank=RANK, alpha=8.0, **SPECS.get(method, {})).build(model, profile)
    base = {name: t.detach().clone() for name, t in model.state_dict().items()}
    inject_adapters(model, plan, expert_kernel="torch")
    return base, model, plan, adapter_sites(model, plan), profile, tokens


def randomize(model) -> None:
    """B is zero at injection: random floats everywhere (masks stay all ones), so every site's merge shows."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)


def expected_adapter_modules(model, sites) -> set[str]:
    """Where injection must put an adapter module for each site (the layouts' own conventions)."""
    fused = architecture_for(model).fused
    found = set()
    for site in sites:
        if site.kind == "router":
            found.add(f"{site.module}.parametrizations.weight.0")  # a 16-bit router: the LoRA is parametrization 0
        elif site.kind == "routed_expert":  # fused: on the experts module; ModuleList: on the MoE block
            found.add(f"{site.module if fused else site.module.rsplit('.', 1)[0]}.hellora_lora")
        else:
            found.add(site.path)
    return found


def adapter_held_bytes(model) -> int:
    """Real bytes of every adapter tensor: parameters, masks, active ranks and the expert -> slot maps."""
    tensors = {id(t): t for t in adapter_state_dict(model).values()}
    for module in adapter_modules(model).values():
        tensors.update({id(b): b for b in module.buffers(recurse=False) if b is not None})
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("family, method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_injection_counts_flops_memory_merge_and_export_agree_with_the_sites(family, method, tmp_path):
    base, model, plan, sites, profile, tokens = adapted(family, method)
    arch = architecture_for(model)
    assert sites, "every method adapts something"
    assert {s.kind for s in sites} >= ({"attention"} if method != "esft" else {"routed_expert"})

    # -- injection: an adapter at each site's path, of the site's shape, rank and experts, and nowhere else
    assert set(adapter_modules(model)) == expected_adapter_modules(model, sites)
    moe_layers = {moe.index: moe for moe in arch.moe_layers(model)}
    for site in sites:
        out_features, in_features = site.shape
        if site.kind == "routed_expert":
            adapter = layer_expert_adapter(moe_layers[site.layer])
            assert adapter.hot_experts.tolist() == list(site.experts)
            if site.form == "full":
                assert isinstance(adapter, ExpertDelta)
                assert adapter.lora_delta[site.name].shape == (len(site.experts), out_features, in_features)
            else:
                assert adapter.lora_A[site.name].shape == (len(site.experts), site.rank, in_features)
                assert adapter.lora_B[site.name].shape == (len(site.experts), out_features, site.rank)
                active = adapter.lora_active_rank
                assert (None if active is None else tuple(active.tolist())) == site.active_ranks
            if not arch.fused:  # each hot expert's linear is wrapped, every cold one is not
                for expert in range(plan.num_experts):
                    linear = model.get_submodule(f"{site.module}.{expert}.{site.name}")
                    assert isinstance(linear, ExpertSlotLinear) == (expert in site.experts)
            continue
        lora = (
            router_lora(model.get_submodule(site.module)) if site.kind == "router" else model.get_submodule(site.path)
        )
        assert lora is not None and lora.rank == site.rank
        assert lora.lora_A.shape == (site.rank, in_features) and lora.lora_B.shape == (out_features, site.rank)
        assert (lora.lora_B_mask is not None) == (site.form == "lori")

    # -- parameter counts: what the model holds and trains is what the sites count
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    assert sum(p.numel() for p in params) == allocated_elements(sites)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == gradient_elements(sites)
    assert plan.trainable_params == trainable_params(sites, plan)

    check_flops(model, sites, profile, tokens, arch)

    # -- export: PEFT targets exactly the sites (ESFT's full-rank deltas are refused, nothing written)
    randomize(model)
    if method == "esft":
        with pytest.raises(ValueError, match="export_merged"):
            export_peft(model, plan, tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
    else:
        config = json.loads((export_peft(model, plan, tmp_path / "peft") / PEFT_CONFIG_FILE).read_text())
        modules, parameters = set(), set()
        for site in sites:
            if site.kind == "router" or (site.kind == "routed_expert" and arch.fused):
                parameters.add(site.path)
            elif site.kind == "routed_expert":
                modules.update(f"{site.module}.{expert}.{site.name}" for expert in site.experts)
            else:
                modules.add(site.path)
        assert set(config["target_modules"]) == modules and set(config["target_parameters"]) == parameters

    # -- merge: exactly the base weights at the sites change (routed: exactly the hot experts' rows)
    merge_adapters(model, plan=plan)
    merged = model.state_dict()
    assert set(merged) == set(base)
    expected: dict[str, list[int] | None] = {}  # weight -> changed rows of a fused experts tensor (None: whole)
    for site in sites:
        if site.kind == "router":
            expected[f"{site.module}.weight"] = None
        elif site.kind == "routed_expert" and arch.fused:
            expected[site.path] = list(site.experts)
        elif site.kind == "routed_expert":
            expected.update({f"{site.module}.{expert}.{site.name}.weight": None for expert in site.experts})
        else:
            expected[f"{site.path}.weight"] = None
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed == set(expected)
    for name, rows in expected.items():
        if rows is not None:
            differs = (base[name] != merged[name]).flatten(1).any(dim=1)
            assert differs.nonzero().flatten().tolist() == rows


@pytest.mark.parametrize("family, method", CASES)
def test_memory_estimate_of_adapters_is_what_injection_allocates(family, method):
    """The estimate's adapter bytes (float32 adapters) are the bytes of every adapter tensor held."""
    _, model, plan, _, profile, _ = adapted(family, method)
    settings = MemorySettings(batch_size=1, seq_len=8, adapter_dtype="float32")
    report = memory_report(model, plan, profile.load(), settings)
    assert report["figures"]["adapters"]["value"] == adapter_held_bytes(model)


def check_flops(model, sites, profile, tokens, arch) -> None:
    """Measured adapter FLOPs of one forward against `adapter_flops`, where the measure is honest.

    Measured per adapter module as its FLOPs minus its base layer's (FlopCounterMode attributes
    matmuls to modules): attention and shared-expert LoRA (x A^T, then B), and ModuleList experts
    (each hot expert's slot update on the rows routed to it, counted from the batch's routing).
    Not measured: the router LoRA, which builds W + BA once per forward rather than per token
    (the budget counts the per-token equivalent 2 r (H + E)); fused experts, whose adapted path
    recomputes the base expert matmuls too, so the adapter's share is not separable. DR-LoRA's
    torch path multiplies at the allocated rank (inactive slices are zeros), so its measure is
    compared with the sites at that rank; the budget counts the active ranks.
    """
    n_tokens = tokens["input_ids"].numel()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**tokens)
    counts = {name: sum(per_op.values()) for name, per_op in counter.get_flop_counts().items()}
    root = type(model).__name__  # heads every module path FlopCounterMode reports

    def adapter_only(path: str) -> int:
        return counts.get(f"{root}.{path}", 0) - counts.get(f"{root}.{path}.base_layer", 0)

    token_sites = [s for s in sites if s.kind in ("attention", "shared_expert")]
    want = adapter_flops(token_sites, [], arch.top_k(model.config), None)
    assert sum(adapter_only(s.path) for s in token_sites) == n_tokens * (want["attention"] + want["shared_experts"])
    if arch.fused:
        return
    routed = [s for s in sites if s.kind == "routed_expert"]
    routed = [s if s.active_ranks is None else with_expert_rank([s], s.rank)[0] for s in routed]
    measured = sum(adapter_only(f"{s.module}.{e}.{s.name}") for s in routed for e in s.experts)
    shares = profile.load()
    top_k = arch.top_k(model.config)
    want = adapter_flops(routed, profile.layers, top_k, shares)["experts"] * n_tokens
    assert measured > 0 or not routed
    assert measured == pytest.approx(want, rel=1e-9)  # shares are count ratios: float rounding only


def test_an_adapter_out_of_the_plan_is_refused_by_merge_and_export(tmp_path):
    """Sites come from the plan: a model holding adapters at no site of it is an error, not a silent skip."""
    _, model, plan, _, _, _ = adapted("olmoe", "attention_only")
    other = resolve_method("attention_only", rank=RANK, alpha=8.0, attention_modules=["q_proj"]).build(model, None)
    with pytest.raises(ValueError, match="adapters at no site of the plan"):
        export_peft(model, other, tmp_path / "peft")
    with pytest.raises(ValueError, match="adapters at no site of the plan"):
        merge_adapters(model, plan=other)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * 2  # nothing was merged
    merge_adapters(model, plan=plan)
    assert not adapter_modules(model)
