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
    # fp32 sums in another order: the pretrained miniature's logits reach about 10, so tolerances are relative too
    torch.testing.assert_close(got_peft, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_merged, expected, rtol=1e-4, atol=1e-4)


def test_override_file_merges_with_the_quickstart_into_a_real_model_run(tmp_path):
    """ "Point a config at a real model": the README's my_overrides.yaml on top of the quickstart gives
    the real model's backbone and tokenizer and keeps the rest (LightningCLI's --print_config, nothing loaded)."""
    import yaml

    text = readme()
    block = re.search(r"```yaml\n(# my_overrides\.yaml\n.*?)```", text, flags=re.DOTALL)
    assert block, "no my_overrides.yaml block in README.md"
    (tmp_path / "my_overrides.yaml").write_text(block.group(1))
    quickstart = str(README.parent / "configs" / "quickstart.yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "hellora_pl", "fit", "--config", quickstart, "--config", "my_overrides.yaml", "--print_config"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    merged = yaml.safe_load(done.stdout)
    backbone = merged["model"]["backbone"]
    assert backbone["pretrained"] == "allenai/OLMoE-1B-7B-0924" and backbone["dtype"] == "bfloat16"
    assert backbone["model_type"] is None and not backbone["config"]  # nothing of a config-built model remains
    assert merged["data"]["init_args"]["tokenizer"] == "allenai/OLMoE-1B-7B-0924"
    assert merged["hellora"]["method"] == "hellora" and merged["trainer"]["max_steps"] == 300  # the rest is kept
