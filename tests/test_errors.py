"""Bad input stops early with a message that says what to change."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO, TINY_OLMOE
from hellora_pl import BackboneConfig, HotExpertInjectionCallback, RoutingProfilerCallback, load_backbone
from hellora_pl.adapters import build_plan, inject_adapters, load_adapter
from hellora_pl.backbones import UnsupportedArchitectureError, architecture_for
from hellora_pl.routing import AllExperts, TopKPerLayer


def test_unknown_architecture_names_the_supported_ones():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match=r"(?s)model_type 'llama'.*olmoe.*register_architecture"):
        architecture_for(llama)
    with pytest.raises(
        ValueError, match="Unknown model_type .llama.; hellora_pl supports deepseek.*mixtral, olmoe, qwen2_moe"
    ):
        load_backbone(BackboneConfig(model_type="llama", config={}))


def test_backbone_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one of `pretrained`"):
        load_backbone(BackboneConfig())
    with pytest.raises(ValueError, match="exactly one of `pretrained`"):
        load_backbone(BackboneConfig(pretrained="x", model_type="olmoe"))


def test_missing_local_backbone_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(BackboneConfig(pretrained="./no/such/model"))


@pytest.mark.parametrize(
    "rank,router_rank,match",
    [
        (0, None, "rank must be positive"),
        (33, None, r"larger than layer 0 self_attn.q_proj's smaller dimension \(32 x 32\); choose rank <= 32"),
        (4, 9, r"larger than layer 0 router's smaller dimension \(8 x 32\); choose rank <= 8"),
        (25, None, r"choose rank <= 24"),
    ],
)
def test_rank_must_fit_every_adapted_matrix(model, rank, router_rank, match):
    plan = build_plan(
        model, AllExperts(), None, rank=rank, alpha=8.0, router_rank=router_rank,
        attention_modules=[] if rank == 25 else None,
    )  # fmt: skip
    with pytest.raises(ValueError, match=match):
        inject_adapters(model, plan)


def test_k_larger_than_experts_stops_the_plan(model, token_batch):
    from hellora_pl.routing import RoutingRecorder

    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.armed = True
        model(**token_batch)
    with pytest.raises(ValueError, match="k=9 is larger than the number of experts"):
        build_plan(model, TopKPerLayer(k=9), recorder.profile(), rank=4, alpha=8.0)


def test_missing_files_name_the_path(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_profile.json"):
        RoutingProfilerCallback(profile_path=str(tmp_path / "no_profile.json")).ensure_profile(None, None)
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        load_adapter(model, tmp_path)


def test_bad_profiler_arguments():
    with pytest.raises(ValueError, match="fraction must be in"):
        RoutingProfilerCallback(fraction=0)
    with pytest.raises(ValueError, match="num_batches must be >= 1"):
        RoutingProfilerCallback(num_batches=0)


def test_callbacks_name_a_missing_model_attribute():
    import lightning.pytorch as pl

    class Elsewhere(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = load_backbone(BackboneConfig(model_type="olmoe", config=TINY_OLMOE))

    trainer = pl.Trainer(logger=False, accelerator="cpu")
    with pytest.raises(AttributeError, match="set the callback's `model_attribute`"):
        HotExpertInjectionCallback().setup(trainer, Elsewhere(), "fit")


@pytest.mark.parametrize("where", ["flag", "yaml"])
def test_config_typo_is_reported_by_the_cli(tmp_path, where):
    (tmp_path / "typo.yaml").write_text("model:\n  learning_rat: 0.1\n")
    typo = ["--model.learning_rat=0.1"] if where == "flag" else ["--config", str(tmp_path / "typo.yaml")]
    result = subprocess.run(
        [sys.executable, "-m", "hellora_pl", "fit", "--config", str(REPO / "configs" / "quickstart.yaml"), *typo],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "learning_rat" in result.stderr
    assert not (tmp_path / "runs").exists()
