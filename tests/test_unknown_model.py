"""A model type hellora_pl has no description of is refused at load, on every path (Python API, the
fit CLI, budget --config/--model), with one message: what is missing and how to describe a new family
(issue: gpt-oss stopped with "Unknown model_type" and no word on how to add it). The unknown model here
is a dense Llama: MoE families are now detected from the model built on meta, so a dense one is the type
that stays unknown whatever detection learns (tests/test_detected_loading.py: refusals with a reason)."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from conftest import REPO
from hellora_pl import BackboneConfig, load_backbone
from hellora_pl.backbones import UnsupportedArchitectureError
from hellora_pl.budget import main as budget_main
from hellora_pl.cli import main as cli_main

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def assert_says_how_to_describe_it(text: str) -> None:
    flat = " ".join(text.split())
    assert "Unknown model_type 'llama'" in flat
    assert "hellora_pl supports" in flat and "olmoe" in flat  # what is known
    assert "no description of where this family's decoder layers, attention, routers and experts live" in flat
    assert "hellora_pl.backbones.MoEArchitecture(...)" in flat and "hellora_pl.backbones.register_architecture" in flat
    assert "'Adding an architecture or expert layout' in ARCHITECTURE.md" in flat


@pytest.fixture
def gpt_oss_dir(tmp_path):
    """A tiny dense Llama config.json (a real transformers type with no experts: never adaptable), offline."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16,
    )  # fmt: skip
    folder = tmp_path / "llama_tiny"
    config.save_pretrained(folder)
    return folder


def test_python_api_from_config_and_from_a_folder(gpt_oss_dir):
    with pytest.raises(UnsupportedArchitectureError) as from_config:
        load_backbone(BackboneConfig(model_type="llama", config={"num_hidden_layers": 2}))
    assert_says_how_to_describe_it(str(from_config.value))
    with pytest.raises(UnsupportedArchitectureError) as from_folder:
        load_backbone(BackboneConfig(pretrained=str(gpt_oss_dir)))
    assert_says_how_to_describe_it(str(from_folder.value))
    assert str(gpt_oss_dir) in str(from_folder.value)  # where the config came from


def refused_fit(args, capfd, tmp_path, monkeypatch) -> str:
    """Run `fit` in-process from an empty folder; it must exit 2 leaving nothing behind."""
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", QUICKSTART, *args])
    assert exit_info.value.code == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert "routing profile" not in (out + err).lower()  # refused before any profiling
    assert not set(tmp_path.rglob("*")) - before, "a refused run left files"
    return err


@pytest.mark.parametrize("source", ["model_type", "pretrained"])
def test_fit_cli_exits_2_with_the_message(source, gpt_oss_dir, capfd, tmp_path, monkeypatch):
    if source == "model_type":
        args = ["--model.backbone.pretrained", "null", "--model.backbone.model_type", "llama"]
    else:
        args = ["--model.backbone.model_type", "null", "--model.backbone.pretrained", str(gpt_oss_dir),
                "--model.backbone.config", "{}"]  # fmt: skip
    err = refused_fit(args, capfd, tmp_path, monkeypatch)
    assert "error:" in err
    assert_says_how_to_describe_it(err)


@pytest.mark.parametrize("flag", ["--config", "--model"])
def test_budget_config_and_model_say_the_same(flag, gpt_oss_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        budget_main([flag, str(gpt_oss_dir), "--method", "hellora"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1  # budget prints errors on one line
    assert_says_how_to_describe_it(err)
