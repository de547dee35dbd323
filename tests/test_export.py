"""Export: a PEFT LoRA adapter that PEFT loads on the same base with the same outputs, and merged checkpoints."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import TINY_OLMOE, tiny_olmoe
from hellora_pl.adapters import (
    DynamicRankSpec,
    ExpertLoRA,
    LoRISpec,
    adapter_state_dict,
    build_plan,
    inject_adapters,
    is_injected,
    layer_expert_adapter,
)
from hellora_pl.adapters.export import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, export_merged, export_peft
from hellora_pl.adapters.router import router_lora
from hellora_pl.backbones import BackboneConfig, architecture_for
from hellora_pl.backbones.tiny import tiny_backbone_config
from hellora_pl.loading import load_backbone
from hellora_pl.routing import AllExperts, CoveragePerLayer, RoutingRecorder, TopKPerLayer

peft = pytest.importorskip("peft")

TINY_DEEPSEEK_MOE = dict(vocab_size=64, n_routed_experts=8, n_shared_experts=1, initializer_range=0.2)


def make_model(family: str):
    if family == "olmoe":
        return tiny_olmoe()
    if family == "mixtral":
        return load_backbone(tiny_backbone_config("mixtral"))
    return load_backbone(BackboneConfig(model_type="tiny_deepseek_moe", config=TINY_DEEPSEEK_MOE))


def routing_profile(model, batch):
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.armed = True
        model(**batch)
    return recorder.profile()


def make_plan(model, batch, method: str, router_rank):
    options = dict(rank=4, alpha=8.0, router_rank=router_rank, method=method)
    if method == "lora":
        return build_plan(model, AllExperts(), None, **options)
    if method == "dr_lora":
        # rank_max 8, not 6: the adapted expert path's grouped_mm needs 16-byte row strides (r * 4 bytes in fp32)
        return build_plan(model, AllExperts(), None, dynamic_rank=DynamicRankSpec(rank_init=2, rank_max=8), **options)
    if method == "hellori":
        options["lori"] = LoRISpec(0.5, "model", masked=True)
    return build_plan(model, TopKPerLayer(), routing_profile(model, batch), **options)


def randomize(model, seed: int = 0) -> None:
    """Random A and B (B is zero at init), LoRI masks with zeros, and distinct DR-LoRA active ranks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            if tensor.dtype == torch.bool:  # LoRI masks: keep about half of B
                tensor.copy_(torch.rand(tensor.shape, generator=generator) < 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
        for moe in architecture_for(model).moe_layers(model):
            adapter = layer_expert_adapter(moe)
            if isinstance(adapter, ExpertLoRA) and adapter.lora_active_rank is not None:
                # 1 .. 6 < rank_max: the export keeps only the rank slices some expert uses (R = 6)
                ranks = [(slot + moe.index) % 6 + 1 for slot in range(adapter.num_hot)]
                adapter.lora_active_rank.copy_(torch.tensor(ranks))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


CASES = [
    ("olmoe", "lora", 4),
    ("olmoe", "hellora", 4),
    ("olmoe", "dr_lora", 4),
    ("olmoe", "hellori", 2),  # LoRI masks, router rank below the export rank (padded)
    ("mixtral", "lora", None),
    ("mixtral", "hellora", 4),
    ("mixtral", "dr_lora", 4),
    ("tiny_deepseek_moe", "hellora", 4),  # nn.ModuleList experts, shared experts
    ("tiny_deepseek_moe", "dr_lora", 4),
]


@pytest.mark.parametrize("family, method, router_rank", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_peft_export_reproduces_adapted_logits(family, method, router_rank, token_batch, tmp_path):
    model = make_model(family)
    base = logits(model, token_batch)
    plan = make_plan(model, token_batch, method, router_rank)
    inject_adapters(model, plan)
    randomize(model)
    expected = logits(model, token_batch)
    assert (expected - base).abs().max() > 1e-2  # the adapter matters, so a no-op load would fail

    out = export_peft(model, plan, tmp_path / "peft")
    config = json.loads((out / PEFT_CONFIG_FILE).read_text())
    assert config["lora_alpha"] == config["r"] == (6 if method == "dr_lora" else 4)
    exported = load_file(str(out / PEFT_WEIGHTS_FILE))

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns about missing or unexpected adapter keys
        peft_model = peft.PeftModel.from_pretrained(make_model(family), out)
    assert set(exported) == set(peft.get_peft_model_state_dict(peft_model))
    got = logits(peft_model, token_batch)
    assert (got - expected).abs().max() <= 1e-5

    if family == "olmoe" and method in ("hellora", "dr_lora"):
        check_parameter_layout(model, peft_model)


def check_parameter_layout(model, peft_model):
    """PEFT's per-parameter deltas equal ours: hot experts at their index, cold experts zero, routers."""
    arch = architecture_for(model)
    peft_layers = {moe.index: moe for moe in arch.moe_layers(peft_model.base_model.model)}
    for moe in arch.moe_layers(model):
        wrapper = peft_layers[moe.index].block.experts
        adapter = layer_expert_adapter(moe)
        seen = []
        while isinstance(wrapper, peft.tuners.lora.ParamWrapper):  # outermost first
            name = wrapper.parameter_name
            ours = torch.zeros_like(getattr(moe.experts, name))
            ours[adapter.hot_experts] = adapter.delta_weight(name).detach()
            torch.testing.assert_close(wrapper.get_delta_weight("default"), ours, atol=1e-6, rtol=1e-5)
            seen.append(name)
            wrapper = wrapper.base_layer
        assert seen == ["down_proj", "gate_up_proj"]  # the first registered parameter is the innermost
        router = peft_layers[moe.index].block.gate
        torch.testing.assert_close(
            router.get_delta_weight("default"), router_lora(moe.router).delta_weight().detach(), atol=1e-6, rtol=1e-5
        )


def esft_model(batch):
    model = tiny_olmoe()
    policy = CoveragePerLayer(coverage=0.2, by="count")
    plan = build_plan(
        model,
        policy,
        routing_profile(model, batch),
        rank=4,
        alpha=8.0,
        method="esft",
        expert_adapter="full",
        attention_modules=[],
        shared_expert_modules=[],
    )
    inject_adapters(model, plan)
    randomize(model)
    return model, plan


def test_esft_cannot_be_lora_but_merges(token_batch, tmp_path):
    model, plan = esft_model(token_batch)
    adapted = logits(model, token_batch)
    with pytest.raises(ValueError, match="export_merged"):
        export_peft(model, plan, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    export_merged(model, tmp_path / "merged")
    assert not is_injected(model)  # merged in place
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, token_batch), adapted, atol=1e-5, rtol=1e-5)
    assert set(reloaded.state_dict()) == set(tiny_olmoe().state_dict())


def test_exports_refuse_a_non_empty_directory(token_batch, tmp_path):
    model = tiny_olmoe()
    plan = make_plan(model, token_batch, "hellora", 4)
    inject_adapters(model, plan)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_peft(model, plan, tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_merged(model, tmp_path)
    assert is_injected(model)  # refused before merging
    export_peft(model, plan, tmp_path, overwrite=True)
    assert (tmp_path / PEFT_WEIGHTS_FILE).is_file() and (tmp_path / "notes.txt").read_text() == "keep me"
    export_merged(model, tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.num_experts == TINY_OLMOE["num_experts"]
