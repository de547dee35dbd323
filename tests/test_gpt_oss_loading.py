"""gpt-oss as published: an MXFP4 checkpoint loads dequantized, or NF4 with `quantization: nf4`, and trains.

The checkpoint is written here, offline: a tiny gpt_oss saved by transformers, its expert tensors
replaced by MXFP4 `<proj>_blocks` / `<proj>_scales` built from known FP4 (e2m1) codes and E8M0
exponents, and `quantization_config: {"quant_method": "mxfp4"}` in config.json, as openai/gpt-oss-20b
has them. The expected dense weights are computed here from the e2m1 table and 2^(scale - 127).
"""

import json

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file, save_file

from conftest import RandomTokens, make_trainer, today_twins
from hellora_pl import HelloraModule, HotExpertInjectionCallback, RoutingProfilerCallback
from hellora_pl.adapters import adapter_state_dict
from hellora_pl.backbones import BackboneConfig, architecture_for
from hellora_pl.loading import load_backbone



TODAY_TWINS = today_twins()

# FP4 e2m1: sign bit, 2 exponent bits, 1 mantissa bit (the OCP MX spec's table, code 0..15).
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
BLOCK = 32  # MXFP4 values sharing one E8M0 scale
# MXFP4 packs 32-value rows: the tiny twin's widths, with intermediate_size a multiple of 32.
FIELDS = {**TODAY_TWINS["gpt_oss"][1], "intermediate_size": 32}
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"
    ],
}


def mxfp4_pair(out_rows: int, in_cols: int, experts: int, generator: torch.Generator):
    """Blocks [E, out, in/32, 16] and scales [E, out, in/32] of random codes, and the logical [E, out, in] they mean."""
    codes = torch.randint(0, 16, (experts, out_rows, in_cols), generator=generator)
    exponents = torch.randint(120, 131, (experts, out_rows, in_cols // BLOCK), generator=generator)
    pairs = codes.view(experts, out_rows, in_cols // 2, 2)
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)  # even column in the low nibble
    blocks = blocks.view(experts, out_rows, in_cols // BLOCK, BLOCK // 2)
    scale = torch.tensor([2.0 ** (int(e) - 127) for e in exponents.reshape(-1)]).view(exponents.shape)
    values = torch.tensor(E2M1)[codes] * scale.repeat_interleave(BLOCK, dim=-1)
    return blocks, exponents.to(torch.uint8), values


def write_mxfp4_checkpoint(path):
    """A tiny gpt_oss checkpoint in MXFP4 form; returns the logical [E, out, in] experts it encodes, by tensor name."""
    model = load_backbone(BackboneConfig(model_type="gpt_oss", config=dict(FIELDS), attn_implementation="eager"))
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = MXFP4_CONFIG
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    expected = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        stored = tensors.pop(name)  # [E, in, out]
        experts, in_cols, out_rows = stored.shape
        blocks, scales, values = mxfp4_pair(out_rows, in_cols, experts, generator)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        expected[name] = values
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return expected


@pytest.fixture
def mxfp4_checkpoint(tmp_path):
    return tmp_path, write_mxfp4_checkpoint(tmp_path)


def test_mxfp4_checkpoint_loads_dequantized_to_the_encoded_values(mxfp4_checkpoint):
    path, expected = mxfp4_checkpoint
    model = load_backbone(BackboneConfig(pretrained=str(path), dtype="float32", attn_implementation="eager"))
    state = model.state_dict()
    assert len(expected) == 4  # gate_up and down of both layers
    for name, values in expected.items():
        stored = state[name]
        assert stored.dtype == torch.float32
        assert torch.equal(stored.transpose(-2, -1), values)  # e2m1 x 2^k: exact in fp32
    assert getattr(model.config, "quantization_config", None) is None  # a plain dense model now
    bf16 = load_backbone(BackboneConfig(pretrained=str(path), dtype="bfloat16", attn_implementation="eager"))
    name = next(iter(expected))
    assert bf16.state_dict()[name].dtype == torch.bfloat16
    assert torch.equal(bf16.state_dict()[name].float().transpose(-2, -1), expected[name])  # exact in bf16 too


def test_mxfp4_checkpoint_quantizes_to_nf4_while_loading(mxfp4_checkpoint, monkeypatch):
    """Dequantized MXFP4, then NF4 as each tensor loads: the same NF4 storage as quantizing the dense model after."""
    from hellora_pl.quant import NF4Weight, quantize_model, quantized_bytes, quantized_storage
    from hellora_pl.quant.loading import HelloraNF4Quantizer

    path, expected = mxfp4_checkpoint
    seen = {}
    original = HelloraNF4Quantizer.quantize

    def recording(self, name, dense):
        seen[name] = (tuple(dense.shape), dense.dtype)
        original(self, name, dense)

    monkeypatch.setattr(HelloraNF4Quantizer, "quantize", recording)
    loaded = load_backbone(
        BackboneConfig(pretrained=str(path), dtype="bfloat16", attn_implementation="eager", quantization="nf4")
    )
    monkeypatch.undo()
    # Each MXFP4 expert tensor reached the NF4 step dequantized, in the stored [E, in, out] orientation.
    assert {name: seen[name] for name in expected} == {
        name: ((8, values.shape[2], values.shape[1]), torch.bfloat16) for name, values in expected.items()
    }
    dense = load_backbone(BackboneConfig(pretrained=str(path), dtype="bfloat16", attn_implementation="eager"))
    quantize_model(dense, "nf4")
    got, want = quantized_storage(loaded), quantized_storage(dense)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert set(quantized_bytes(loaded)) == {"experts", "attention", "router"}
    for moe in architecture_for(loaded).moe_layers(loaded):
        weight = moe.experts.gate_up_proj
        assert isinstance(weight, NF4Weight) and weight.shape == (8, 64, 32)  # logical [E, 2I, H]
        values = expected[f"model.layers.{moe.index}.mlp.experts.gate_up_proj"]
        blocks = values.reshape(-1, 64).abs().amax(1, keepdim=True)  # NF4's widest gap is < 0.35 of a block's absmax
        assert ((weight.dequantize().float() - values).reshape(-1, 64).abs() <= 0.2 * blocks).all()
    experts = ("gate_up_proj", "down_proj")
    assert not {n for n, p in loaded.named_parameters() if p.numel() > 0 and n.endswith(experts)}


def test_other_prequantized_checkpoints_are_refused_by_name(mxfp4_checkpoint):
    path, _ = mxfp4_checkpoint
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"already quantized \(fp8\).*mxfp4"):
        load_backbone(BackboneConfig(pretrained=str(path), dtype="bfloat16", quantization="nf4"))


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_mxfp4_gpt_oss_trains_two_steps_with_hellora(tmp_path, quantization):
    path = tmp_path / "base"
    path.mkdir()
    write_mxfp4_checkpoint(path)
    config = BackboneConfig(pretrained=str(path), attn_implementation="eager", quantization=quantization)
    module = HelloraModule(config, learning_rate=1e-2, warmup=0)
    losses = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    injection = HotExpertInjectionCallback(method="hellora", rank=4, alpha=8)
    callbacks = [RoutingProfilerCallback(num_batches=2), injection, Losses()]
    make_trainer(tmp_path / "run", 2, callbacks).fit(module, datamodule=RandomTokens())
    model = module.model
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    adapters = adapter_state_dict(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= adapters.keys()
    experts_b = [t for n, t in adapters.items() if "experts" in n and "lora_B" in n]
    assert experts_b and any(t.abs().sum() > 0 for t in experts_b)  # the expert adapters trained
