"""A family detected from the model (not registered) loads and trains on every path: the Python API
(`load_backbone` from a config or a local checkpoint folder), the Lightning module, the fit CLI and
the budget tool. A family detection refuses is refused on those paths with detection's reason,
before any weight is read or allocated (the model is built on the meta device to be understood)."""

from __future__ import annotations

import json

import pytest
import torch
from test_detection import REFUSED
from transformers import AutoConfig

from conftest import REPO, RandomTokens, make_trainer
from hellora_pl import BackboneConfig, HelloraModule, HotExpertInjectionCallback, RoutingProfilerCallback, load_backbone
from hellora_pl.adapters import adapter_state_dict
from hellora_pl.backbones import ARCHITECTURES, UnsupportedArchitectureError, architecture_for
from hellora_pl.backbones.detect import DETECTED, DetectionRefused
from hellora_pl.backbones.tiny import tiny_config_for
from hellora_pl.budget import main as budget_main
from hellora_pl.cli import main as cli_main

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
SHORT = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.num_train=32",
    "--data.init_args.num_val=8",
]

# The quickstart's data on a model built from a config instead of its pretrained miniature, with the character
# tokenizer (vocabulary 128) that fits a toy vocabulary.
ON_A_TINY_MODEL = [
    "--model.backbone.pretrained=null",
    "--data.init_args.tokenizer=builtin:char",
    "--data.init_args.max_length=192",
]
# GLM-4.5's family at toy size: 2 layers (the first dense, as in the real model), 8 routed experts, top-2,
# a shared expert and group-limited sigmoid routing. Vocabulary 128: the character tokenizer's.
TINY_GLM4_MOE = {
    "vocab_size": 128, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
    "first_k_dense_replace": 1, "max_position_embeddings": 256, "pad_token_id": 0, "bos_token_id": 1,
    "eos_token_id": 2, "initializer_range": 0.2,
}  # fmt: skip
REFUSED_FAMILY = "jetmoe"  # refused by detection (tests/test_detection.py REFUSED says why)


def glm4_moe_backbone(**fields) -> BackboneConfig:
    return BackboneConfig(model_type="glm4_moe", config={**TINY_GLM4_MOE, **fields})


class NoWeights:
    """Stands for AutoModelForCausalLM in hellora_pl.loading: records any attempt to build or read weights."""

    calls: list[str] = []

    @classmethod
    def from_config(cls, *args, **kwargs):
        cls.calls.append("from_config")
        raise AssertionError("a refused model was built")

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        cls.calls.append("from_pretrained")
        raise AssertionError("a refused model's weights were read")


@pytest.fixture
def no_weights(monkeypatch):
    NoWeights.calls = []
    monkeypatch.setattr("hellora_pl.loading.AutoModelForCausalLM", NoWeights)
    monkeypatch.setattr("hellora_pl.loading.load_quantized", NoWeights.from_pretrained)
    return NoWeights.calls


def test_glm4_moe_is_not_registered():
    """The premise: these tests load a family that only detection knows."""
    assert "glm4_moe" not in ARCHITECTURES


def test_a_detected_family_trains_two_steps_through_the_module(tmp_path):
    module = HelloraModule(glm4_moe_backbone(), learning_rate=1e-2, warmup=1)
    arch = architecture_for(module.model)
    assert arch.notes == DETECTED and arch.fused
    assert module.model.config._experts_implementation == "grouped_mm"  # the fused path took the kwarg
    base_before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    injection = HotExpertInjectionCallback(rank=4, alpha=8)
    trainer = make_trainer(tmp_path, 2, [RoutingProfilerCallback(num_batches=1), injection])
    trainer.fit(module, datamodule=RandomTokens())
    assert trainer.global_step == 2
    adapters = adapter_state_dict(module.model)
    assert any("experts" in name for name in adapters), "no expert adapters on the detected MoE layer"
    assert all(not torch.equal(t, torch.zeros_like(t)) for name, t in adapters.items() if "lora_B" in name)
    base_now = dict(module.model.named_parameters())
    assert all(torch.equal(base_before[name], base_now[name]) for name in base_before if name in base_now)


def test_the_fit_cli_trains_a_detected_family(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", QUICKSTART, *ON_A_TINY_MODEL, "--model.backbone.model_type", "glm4_moe",
              "--model.backbone.config", json.dumps(TINY_GLM4_MOE), *SHORT])  # fmt: skip
    (run_dir,) = tmp_path.glob("runs/quickstart/hellora/version_0")
    plan = json.loads((run_dir / "hellora" / "plan.json").read_text())
    assert "glm4_moe" in json.dumps(plan)
    assert (run_dir / "hellora" / "adapter.safetensors").is_file()


def test_a_local_checkpoint_of_a_detected_family_loads(tmp_path):
    saved = load_backbone(glm4_moe_backbone())
    folder = tmp_path / "glm4_moe_tiny"
    saved.save_pretrained(folder)
    loaded = load_backbone(BackboneConfig(pretrained=str(folder)))
    assert architecture_for(loaded).notes == DETECTED
    assert loaded.config._experts_implementation == "grouped_mm"
    expected = saved.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(t, expected[name]) for name, t in loaded.state_dict().items())


def refusal_text(error: BaseException) -> str:
    return " ".join(str(error).split())


def test_a_refused_family_is_refused_before_any_weight(no_weights, tmp_path):
    reason = REFUSED[REFUSED_FAMILY]
    fields = {k: v for k, v in tiny_config_for(REFUSED_FAMILY).to_diff_dict().items() if k != "transformers_version"}
    fields.pop("model_type", None)
    with pytest.raises(UnsupportedArchitectureError) as from_config:
        load_backbone(BackboneConfig(model_type=REFUSED_FAMILY, config=fields))
    folder = tmp_path / "refused"
    AutoConfig.for_model(REFUSED_FAMILY, **fields).save_pretrained(folder)  # a config only: no weights
    with pytest.raises(UnsupportedArchitectureError) as from_folder:
        load_backbone(BackboneConfig(pretrained=str(folder)))
    assert no_weights == []  # neither built nor read
    for error in (from_config.value, from_folder.value):
        text = refusal_text(error)
        assert f"Unknown model_type {REFUSED_FAMILY!r}" in text
        assert "Detection from the model refused it" in text and reason in text
        assert "hellora_pl.backbones.MoEArchitecture(...)" in text  # the fix
    assert str(folder) in refusal_text(from_folder.value)  # where it came from


def test_the_fit_cli_refuses_a_detection_refusal_before_loading(no_weights, tmp_path, monkeypatch, capfd):
    """glm4_moe with detection made to refuse it: the CLI exits 2 with the reason, writing nothing."""

    def refuse(model):
        raise DetectionRefused(model.config.model_type, "a reason only this test gives")

    monkeypatch.setattr("hellora_pl.backbones.registry.detect_architecture", refuse)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", QUICKSTART, *ON_A_TINY_MODEL, "--model.backbone.model_type", "glm4_moe",
                  "--model.backbone.config", json.dumps(TINY_GLM4_MOE), *SHORT])  # fmt: skip
    assert exit_info.value.code == 2
    err = " ".join(capfd.readouterr().err.split())
    assert "Unknown model_type 'glm4_moe'" in err and "a reason only this test gives" in err
    assert no_weights == []
    assert list(tmp_path.rglob("*")) == [], "a refused run left files"


def test_the_budget_counts_a_detected_family(tmp_path, capsys):
    report = budget_main(["--shape", "glm-4.5-air", "--method", "hellora", "--json"])
    backbone = report["backbone"]  # GLM-4.5-Air's public config: 46 layers, the first dense; 128 experts, top-8
    assert (backbone["architecture"], backbone["decoder_layers"], backbone["moe_layers"]) == ("glm4_moe", 46, 45)
    assert (backbone["num_experts"], backbone["top_k"]) == (128, 8)
    folder = tmp_path / "glm4_moe_config"
    AutoConfig.for_model("glm4_moe", **TINY_GLM4_MOE).save_pretrained(folder)
    tiny = budget_main(["--config", str(folder), "--json"])["backbone"]
    assert (tiny["moe_layers"], tiny["num_experts"], tiny["top_k"]) == (1, 8, 2)
    capsys.readouterr()
