"""The README's commands and its own-module snippet stay true to the code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET_MARKER = "<!-- readme-snippet: own-module -->"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def snippet_after(marker: str, text: str) -> str:
    """The first ```python block that follows `marker`."""
    start = text.index(marker)
    found = re.search(r"```python\n(.*?)```", text[start:], flags=re.DOTALL)
    assert found, f"no python code block after {marker!r} in README.md"
    return found.group(1)


def test_readme_names_the_test_and_quickstart_commands():
    text = readme()
    assert "python -m pytest -q" in text
    assert "python -m hellora_pl fit --config configs/quickstart.yaml" in text


def test_own_module_snippet_runs(tmp_path):
    code = snippet_after(SNIPPET_MARKER, readme())
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "hot experts per layer:" in output, output[-6000:]
    assert "adapted experts" in output, output[-6000:]


EXPORT_MARKER = "<!-- readme-snippet: export -->"


def test_export_snippet_runs_and_its_exports_reproduce_the_adapted_model(tmp_path, monkeypatch):
    """The Export snippet, run in a folder holding the run it names: the quickstart's backbone in the
    config.yaml LightningCLI saves, and an adapter folder (random adapters on that base, no fit)."""
    import dataclasses

    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from hellora_pl.adapters import adapter_state_dict, build_plan, inject_adapters, save_adapter
    from hellora_pl.backbones import BackboneConfig
    from hellora_pl.loading import load_backbone
    from hellora_pl.routing import AllExperts

    peft = pytest.importorskip("peft")
    quickstart = yaml.safe_load((README.parent / "configs" / "quickstart.yaml").read_text())
    backbone = BackboneConfig(**quickstart["model"]["backbone"])
    run = tmp_path / "runs" / "quickstart" / "hellora" / "version_0"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"backbone": dataclasses.asdict(backbone)}}))
    model = load_backbone(backbone)
    plan = build_plan(model, AllExperts(), None, rank=4, alpha=8.0, router_rank=4, method="lora")
    inject_adapters(model, plan, expert_kernel="torch")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    save_adapter(run / "hellora", model, plan)
    batch = {"input_ids": torch.randint(3, model.config.vocab_size, (2, 12), generator=generator)}
    with torch.no_grad():
        expected = model(**batch).logits
        assert (expected - load_backbone(backbone)(**batch).logits).abs().max() > 1e-2  # the adapters matter

    monkeypatch.chdir(tmp_path)
    exec(compile(snippet_after(EXPORT_MARKER, readme()), "README.md#export", "exec"), {"__name__": "readme_export"})

    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(load_backbone(backbone), tmp_path / "exported" / "peft")
        got_peft = peft_model(**batch).logits
        got_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exported" / "merged")(**batch).logits
    assert (got_peft - expected).abs().max() <= 1e-5
    assert (got_merged - expected).abs().max() <= 1e-4
