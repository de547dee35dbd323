"""A pretrained checkpoint is quantized tensor by tensor while transformers loads it."""

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from hellora_pl.backbones import BackboneConfig  # noqa: E402
from hellora_pl.loading import load_backbone  # noqa: E402
from hellora_pl.backbones.tiny import TINY_CONFIGS  # noqa: E402
from hellora_pl.quant import quantize_model, quantized_storage  # noqa: E402
from hellora_pl.quant.loading import HelloraNF4Quantizer  # noqa: E402
from hellora_pl.quant.model import quantization_targets  # noqa: E402

FUSED_FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


def tiny(family: str, quantization=None) -> torch.nn.Module:
    config = BackboneConfig(model_type=family, config=dict(TINY_CONFIGS[family][1]), dtype="bfloat16")
    config.quantization = quantization
    return load_backbone(config)


def saved_checkpoint(tmp_path, family: str):
    """A 16-bit checkpoint as transformers writes it (per-expert tensors, un-fused), and the model it came from."""
    model = tiny(family)
    model.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.mark.parametrize("quantization", ["nf4", "nf4-dq"])
@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_quantizing_while_loading_equals_quantizing_after_loading(tmp_path, family, quantization):
    path, reference = saved_checkpoint(tmp_path, family)
    loaded = load_backbone(BackboneConfig(pretrained=str(path), dtype="bfloat16", quantization=quantization))
    quantize_model(reference, quantization)

    expected, got = quantized_storage(reference), quantized_storage(loaded)
    assert got.keys() == expected.keys() and len(got) > 0
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    ids = torch.randint(0, 30, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)  # bit-identical storage, same forward here
    # Nothing dense is left behind in place of a quantized tensor.
    dense = {n for n, p in loaded.named_parameters() if p.numel() > 0}
    assert not dense & {t.name for t in quantization_targets(reference)}


def test_the_model_never_holds_a_dense_copy_of_a_tensor_it_quantizes(tmp_path, monkeypatch):
    path, reference = saved_checkpoint(tmp_path, "mixtral")
    target_names = [t.name for t in quantization_targets(reference)]
    largest = max(t.numel() for n, t in reference.state_dict().items() if n in target_names)
    seen: list[tuple[str, int, list[str]]] = []
    original = HelloraNF4Quantizer.quantize

    def recording(self, name, dense):
        model = self._model_for_test
        held = [n for n, p in model.named_parameters() if n in self.roles and p.numel() > 0 and p.device.type != "meta"]
        seen.append((name, dense.numel(), held))
        original(self, name, dense)

    def before(self, model, **kwargs):
        self._model_for_test = model
        original_before(self, model, **kwargs)

    original_before = HelloraNF4Quantizer._process_model_before_weight_loading
    monkeypatch.setattr(HelloraNF4Quantizer, "quantize", recording)
    monkeypatch.setattr(HelloraNF4Quantizer, "_process_model_before_weight_loading", before)
    load_backbone(BackboneConfig(pretrained=str(path), dtype="bfloat16", quantization="nf4"))

    assert sorted(name for name, _, _ in seen) == sorted(target_names)  # each tensor quantized once, as it loads
    assert all(held == [] for _, _, held in seen)  # no quantized tensor ever sat dense in the model
    assert max(size for _, size, _ in seen) == largest  # one fused tensor at a time, never more


def test_a_checkpoint_missing_a_tensor_to_quantize_fails_clearly(tmp_path):
    path, _ = saved_checkpoint(tmp_path, "olmoe")
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    dropped = [k for k in weights if k.startswith("model.layers.1.mlp.experts.")]
    save_file(
        {k: v for k, v in weights.items() if k not in dropped}, path / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(RuntimeError, match="no weights for 2 tensors to quantize"):
        load_backbone(BackboneConfig(pretrained=str(path), dtype="bfloat16", quantization="nf4"))


def test_an_already_quantized_checkpoint_is_refused(tmp_path):
    path, _ = saved_checkpoint(tmp_path, "olmoe")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="already quantized"):
        load_backbone(BackboneConfig(pretrained=str(path), dtype="bfloat16", quantization="nf4"))


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantizing_in_chunks_gives_bitsandbytes_whole_tensor_codes(monkeypatch, double_quant):
    import bitsandbytes.functional as bnb_functional

    from hellora_pl.quant import nf4

    monkeypatch.setattr(nf4, "CHUNK_VALUES", 1 << 12)  # 4096 values: this tensor takes 15 calls
    weight = torch.randn(5, 96, 128, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    quantized = nf4.NF4Weight(weight, double_quant)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    assert torch.equal(quantized.packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(quantized.absmax.reshape(-1), state.absmax.reshape(-1))
    if double_quant:
        assert torch.equal(quantized.absmax_scale, state.state2.absmax)
        assert float(quantized.absmax_offset) == float(state.offset)  # both absmax.mean() of one tensor, here


def test_the_qlora_config_fits_from_a_saved_checkpoint(tmp_path, shared_data, monkeypatch):
    """The user's path: `fit --config ...qlora...yaml` with `model.backbone.pretrained` pointing at a checkpoint."""
    import yaml

    from conftest import REPO, tiny_twin_cli
    from hellora_pl.callbacks.injection import injection_callback
    from hellora_pl.quant import quantized_bytes

    config_path = REPO / "configs" / "tiny" / "mixtral" / "qlora_hellora_math.yaml"
    backbone = yaml.safe_load(config_path.read_text())["model"]["backbone"]
    load_backbone(BackboneConfig(model_type="mixtral", config=backbone["config"])).save_pretrained(tmp_path / "base")
    monkeypatch.chdir(REPO)  # the config names ../shared/data relative to the repo root
    cli = tiny_twin_cli(
        config_path, tmp_path, f"--model.backbone.pretrained={tmp_path / 'base'}", "--model.backbone.model_type=null"
    )
    assert set(quantized_bytes(cli.model.model)) == {"experts", "attention", "router"}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3
    assert injection_callback(cli.trainer).plan.method == "hellora"
