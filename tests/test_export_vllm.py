"""The vLLM per-expert LoRA export: key names vLLM's loader parses, every expert present, same function.

The key regexes are written from vLLM 0.33.0's loader:
- `vllm/lora/utils.py` `parse_fine_tuned_lora_name`: a key `base_model.model.<module>.lora_A.weight` /
  `.lora_B.weight` names module `<module>` (the prefix is dropped);
- `vllm/lora/lora_model.py` `LoRAModel.from_local_checkpoint.check_unexpected_modules`: an expert key's
  module must end in `experts.<e>.<ckpt name>` for an expert `e` of the layer, any other key's last
  name must be a LoRA-capable layer of the model;
- `vllm/lora/lora_weights.py` `PackedLoRALayerWeights.pack_moe`: every expert of an adapted layer has
  its gate, down and up factors (it asserts each), all experts of a projection at one rank;
- `vllm/lora/peft_helper.py` `PEFTHelper`: scaling lora_alpha / r (use_rslora False).
The oracle below applies the file independently of the exporter: W_e += (alpha / r) * B @ A per key,
gate/up into the halves of the fused gate_up_proj, on a fresh base run with transformers' eager experts.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hellora_pl.adapters import (
    DynamicRankSpec,
    ExpertLoRA,
    LoRISpec,
    adapter_state_dict,
    build_plan,
    inject_adapters,
    layer_expert_adapter,
    save_adapter,
)
from hellora_pl.adapters.export_vllm import export_vllm
from hellora_pl.backbones import architecture_for
from hellora_pl.backbones.tiny import tiny_backbone_config
from hellora_pl.export_cli import main as export_main
from hellora_pl.loading import load_backbone
from hellora_pl.routing import AllExperts, RoutingRecorder, TopKPerLayer

TOLERANCE = 1e-5  # fp32 logits
KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")
EXPERT = re.compile(r"\.experts\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")
# checkpoint names -> (transformers block name, fused projection, half of gate_up_proj or None)
NAMES = {
    "default": ({"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}, None),
    "mixtral": ({"w1": "gate", "w3": "up", "w2": "down"}, "block_sparse_moe"),
}


def base(family: str, seed: int = 0):
    return load_backbone(dataclasses.replace(tiny_backbone_config(family), seed=seed))


def adapted(family: str, method: str, batch):
    """A tiny model with hot-expert adapters (attention, router, experts) and random B, and its plan."""
    model = base(family)
    options = dict(rank=4, alpha=8.0, router_rank=2, method=method)
    if method == "dr_lora":
        plan = build_plan(model, AllExperts(), None, dynamic_rank=DynamicRankSpec(rank_init=2, rank_max=8), **options)
    else:
        if method == "hellori":
            options["lori"] = LoRISpec(0.5, "model", masked=True)
        with RoutingRecorder(model) as recorder, torch.no_grad():
            recorder.armed = True
            model(**batch)
        plan = build_plan(model, TopKPerLayer(), recorder.profile(), **options)
    inject_adapters(model, plan, expert_kernel="torch")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            if tensor.dtype == torch.bool:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) < 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
        for moe in architecture_for(model).moe_layers(model):
            adapter = layer_expert_adapter(moe)
            if isinstance(adapter, ExpertLoRA) and adapter.lora_active_rank is not None:
                adapter.lora_active_rank.copy_(torch.tensor([(s + moe.index) % 6 + 1 for s in range(adapter.num_hot)]))
    return model, plan


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def apply_vllm_file(model, directory, family: str):
    """The oracle: merge each key of the exported file into a fresh base model, as vLLM's math would."""
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    names, block = NAMES.get(family, NAMES["default"])
    if block is not None:  # the checkpoint's block name, not transformers' `mlp`
        assert not any(".mlp." in key for key in tensors) and any(f".{block}." in key for key in tensors)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        assert match, key
        factors.setdefault(match["module"], {})[match["factor"]] = tensor
    with torch.no_grad():
        for module, ab in factors.items():
            delta = scaling * ab["B"] @ ab["A"]
            if block is not None:
                module = module.replace(f".{block}.", ".mlp.")
            expert = EXPERT.search(module)
            if expert is None:  # a linear module, or the router's bare weight
                model.get_submodule(module).weight += delta
                continue
            experts = model.get_submodule(module[: expert.start()] + ".experts")
            e, role = int(expert["expert"]), names[expert["proj"]]
            if role == "down":
                experts.down_proj[e] += delta
            else:
                half = experts.gate_up_proj.shape[1] // 2
                rows = slice(0, half) if role == "gate" else slice(half, 2 * half)
                experts.gate_up_proj[e, rows] += delta
    model.set_experts_implementation("eager")
    return tensors, config


@pytest.mark.parametrize(
    "family, method",
    [("olmoe", "hellora"), ("qwen3_moe", "hellora"), ("mixtral", "hellora"), ("olmoe", "dr_lora"), ("olmoe", "hellori")],
)
def test_vllm_file_applied_by_an_oracle_matches_the_adapted_model(family, method, token_batch, tmp_path):
    model, plan = adapted(family, method, token_batch)
    expected = logits(model, token_batch)
    export_vllm(model, plan, tmp_path / "vllm")

    oracle = base(family)
    assert (logits(oracle, token_batch) - expected).abs().max() > 1e-3  # the adapters change the function
    tensors, config = apply_vllm_file(oracle, tmp_path / "vllm", family)
    torch.testing.assert_close(logits(oracle, token_batch), expected, atol=TOLERANCE, rtol=0)
    assert config["lora_alpha"] == config["r"] and "target_parameters" not in config


def test_every_expert_present_cold_ones_zero_and_keys_as_vllm_parses_them(token_batch, tmp_path):
    model, plan = adapted("qwen3_moe", "hellora", token_batch)
    export_vllm(model, plan, tmp_path / "vllm")
    tensors = load_file(str(tmp_path / "vllm" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    num_experts = model.config.num_experts
    rank = config["r"]

    modules = {KEY.match(key)["module"] for key in tensors}
    assert all(KEY.match(key) for key in tensors)
    for module in modules:  # check_unexpected_modules: the last name (or experts.<e>.<proj>) is a LoRA layer
        assert module.rsplit(".", 1)[-1] in config["target_modules"]
    for layer in plan.layers:
        hot = set(layer.hot_experts)
        assert hot and len(hot) < num_experts  # the test covers hot and cold experts
        prefix = f"model.layers.{layer.layer}.mlp.experts"
        assert sum(m.startswith(prefix + ".") for m in modules) == 3 * num_experts
        experts = architecture_for(model).moe_layers(model)[layer.layer].experts
        intermediate, hidden = experts.down_proj.shape[2], experts.down_proj.shape[1]
        shapes = {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}
        for e in range(num_experts):
            for proj, (out, inp) in shapes.items():
                a = tensors[f"base_model.model.{prefix}.{e}.{proj}.lora_A.weight"]
                b = tensors[f"base_model.model.{prefix}.{e}.{proj}.lora_B.weight"]
                assert a.shape == (rank, inp) and b.shape == (out, rank)
                if e in hot:
                    assert b.abs().sum() > 0, (layer.layer, e, proj)
                else:
                    assert not a.any() and not b.any(), (layer.layer, e, proj)


def test_refuses_what_it_cannot_write(token_batch, tmp_path):
    model = base("olmoe")
    esft = build_plan(
        model, AllExperts(), None, rank=4, alpha=8.0, method="esft", expert_adapter="full",
        attention_modules=[], shared_expert_modules=[],
    )  # fmt: skip
    with pytest.raises(ValueError, match="full-rank expert deltas.*export_merged"):
        export_vllm(model, esft, tmp_path / "esft")

    model, plan = adapted("olmoe", "hellora", token_batch)
    experts = architecture_for(model).moe_layers(model)[0].experts
    experts.is_concatenated = False
    with pytest.raises(ValueError, match="interleaves gate and up rows"):
        export_vllm(model, plan, tmp_path / "interleaved")
    experts.is_concatenated = True
    model.config.model_type = "unknown_moe"
    with pytest.raises(ValueError, match="not known to hellora_pl for model type 'unknown_moe'"):
        export_vllm(model, plan, tmp_path / "unknown")
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_cli_format_vllm(token_batch, tmp_path, capsys):
    model, plan = adapted("olmoe", "hellora", token_batch)
    expected = logits(model, token_batch)
    save_adapter(tmp_path / "run", model, plan)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": {"backbone": dataclasses.asdict(tiny_backbone_config("olmoe"))}}))
    export_main(["--adapter_path", str(tmp_path / "run"), "--config", str(config), "--format", "vllm",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    printed = capsys.readouterr().out
    assert "format: vllm" in printed and "vllm serve" in printed and "--max-lora-rank 8" in printed

    oracle = base("olmoe")
    apply_vllm_file(oracle, tmp_path / "out", "olmoe")
    torch.testing.assert_close(logits(oracle, token_batch), expected, atol=TOLERANCE, rtol=0)


def test_cli_refuses_esft_for_vllm_before_loading_a_model(tmp_path, capsys, monkeypatch):
    model = base("olmoe")
    plan = build_plan(
        model, AllExperts(), None, rank=4, alpha=8.0, method="esft", expert_adapter="full",
        attention_modules=[], shared_expert_modules=[],
    )  # fmt: skip
    inject_adapters(model, plan, expert_kernel="torch")
    save_adapter(tmp_path / "esft", model, plan)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"model": {"backbone": dataclasses.asdict(tiny_backbone_config("olmoe"))}}))
    monkeypatch.setattr("hellora_pl.export_sources.load_backbone", lambda *_: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as exited:
        export_main(["--adapter_path", str(tmp_path / "esft"), "--config", str(config), "--format", "vllm",
                     "--out", str(tmp_path / "out")])  # fmt: skip
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "'esft'" in err and "--format vllm" in err and "--format merged" in err
    assert not (tmp_path / "out").exists()
