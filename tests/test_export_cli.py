"""`python -m hellora_pl export`: a fit's checkpoint or adapter folder to PEFT or a merged model, by the CLI.

Each family fits a few steps in-process, then exports through the CLI (one export per family in a
real `python -m hellora_pl export` subprocess, the others through the same entry point in-process
to keep the suite fast) and loads the results with PEFT and transformers: PEFT's logits within 1e-5
of the adapted model's, the merged model's within 1e-4 (fp32).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import RandomTokens, make_trainer
from hellora_pl import HelloraModule, HotExpertInjectionCallback, RoutingProfilerCallback
from hellora_pl.adapters import ADAPTER_FILE, build_plan, inject_adapters, load_adapter, save_adapter
from hellora_pl.adapters.io import portable_name
from hellora_pl.backbones.tiny import tiny_backbone_config
from hellora_pl.cli import main as cli_main
from hellora_pl.loading import load_backbone
from hellora_pl.routing import AllExperts

peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
PEFT_TOLERANCE = 1e-5
MERGED_TOLERANCE = 1e-4


def fit(root: Path, family: str) -> dict[str, Path]:
    """A few HELLoRA steps on a tiny model: a checkpoint and the run's adapter folder, at the same step."""
    module = HelloraModule(tiny_backbone_config(family), learning_rate=5e-2, warmup=0)
    callbacks = [
        RoutingProfilerCallback(num_batches=1),
        HotExpertInjectionCallback(method="hellora", rank=4, alpha=8),
        ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=STEPS, save_top_k=-1),
    ]
    make_trainer(root, STEPS, callbacks).fit(module, datamodule=RandomTokens())
    return {"ckpt": root / "ckpt" / f"epoch=0-step={STEPS}.ckpt", "adapters": root / "run" / "version_0" / "hellora"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One fit per family for the whole module, made when first asked for."""
    runs = {}

    def get(family: str) -> dict:
        if family not in runs:
            runs[family] = {"family": family, **fit(tmp_path_factory.mktemp(f"fit-{family}"), family)}
        return runs[family]

    return get


@pytest.fixture(params=["olmoe", "mixtral"])
def run(request, fitted):
    return fitted(request.param)


@pytest.fixture
def olmoe_run(fitted):
    return fitted("olmoe")


def base(family: str):
    return load_backbone(tiny_backbone_config(family))


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def adapted_logits(run, batch) -> torch.Tensor:
    """Ours: the base with the run's adapter folder loaded (hellora_pl's own adapted model)."""
    model = base(run["family"])
    load_adapter(model, run["adapters"], expert_kernel="torch")
    return logits(model, batch)


def export(*args: str) -> None:
    """The CLI in this process: the same entry point as `python -m hellora_pl export`."""
    cli_main(["export", *args])


def start_export_subprocess(*args: str, cwd: Path) -> subprocess.Popen:
    """`python -m hellora_pl export` in a child process, left running while the test does the rest."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "hellora_pl", "export", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(child: subprocess.Popen) -> str:
    try:
        output, _ = child.communicate(timeout=300)
    finally:
        child.kill()  # no-op once it has exited
    assert child.returncode == 0, output[-4000:]
    return output


def check_peft(family: str, directory: Path, expected: torch.Tensor, batch) -> None:
    model = peft.PeftModel.from_pretrained(base(family), directory)
    got = logits(model, batch)
    assert (got - expected).abs().max() <= PEFT_TOLERANCE


def check_merged(directory: Path, expected: torch.Tensor, batch) -> None:
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.dtype == torch.float32
    got = logits(model, batch)
    assert (got - expected).abs().max() <= MERGED_TOLERANCE


def test_round_trip_from_checkpoint_and_adapter_folder(run, token_batch, tmp_path, capsys):
    family, ckpt, adapters = run["family"], run["ckpt"], run["adapters"]
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["HotExpertInjectionCallback"]["adapters"]
    folder = load_file(str(adapters / ADAPTER_FILE))
    assert {portable_name(k) for k in saved} == set(folder)
    assert all(torch.equal(saved[k], folder[portable_name(k)]) for k in saved)  # same step: one reference for both
    expected = adapted_logits(run, token_batch)
    assert (expected - logits(base(family), token_batch)).abs().max() > 1e-2  # the adapters matter

    # One format per family through a real `python -m hellora_pl export`, running while the
    # other exports go through the same entry point in this process.
    in_subprocess, in_process = ("merged", "peft") if family == "olmoe" else ("peft", "merged")

    def from_checkpoint(fmt: str) -> list[str]:
        return ["--ckpt_path", str(ckpt), "--format", fmt, "--out", str(tmp_path / f"ckpt-{fmt}")]

    printed = {}
    child = start_export_subprocess(*from_checkpoint(in_subprocess), cwd=tmp_path)
    try:
        export(*from_checkpoint(in_process))
        printed[in_process] = capsys.readouterr().out
        config = tmp_path / "train.yaml"
        config.write_text(training_yaml(family))
        from_folder = ["--adapter_path", str(adapters), "--config", str(config)]
        export(*from_folder, "--format", "peft", "--out", str(tmp_path / "dir-peft"))
    finally:
        printed[in_subprocess] = finish(child)
    for fmt, output in printed.items():
        assert f"format: {fmt}" in output and "method hellora" in output
        assert ("PeftModel.from_pretrained" if fmt == "peft" else "AutoModelForCausalLM.from_pretrained") in output
    check_peft(family, tmp_path / "ckpt-peft", expected, token_batch)
    check_merged(tmp_path / "ckpt-merged", expected, token_batch)
    check_peft(family, tmp_path / "dir-peft", expected, token_batch)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def training_yaml(family: str) -> str:
    """A training config's model section, as `fit --config` reads it."""
    import yaml

    return yaml.safe_dump({"model": {"backbone": dataclasses.asdict(tiny_backbone_config(family))}})


def test_trained_tensors_outside_the_adapters_are_merged_or_refused(olmoe_run, token_batch, tmp_path, capsys):
    """A checkpoint's state_dict holds the run's other trainable tensors: merged carries them, PEFT refuses."""
    checkpoint = torch.load(olmoe_run["ckpt"], weights_only=True)
    assert checkpoint["state_dict"] == {}  # a plain HELLoRA fit trains nothing else
    norm = base("olmoe").model.norm.weight.detach()
    checkpoint["state_dict"] = {"model.model.norm.weight": norm * 1.5}
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)

    with pytest.raises(SystemExit) as refused:
        export("--ckpt_path", str(edited), "--format", "peft", "--out", str(tmp_path / "peft"))
    assert refused.value.code == 2
    message = capsys.readouterr().err
    assert "model.norm.weight" in message and "--format merged" in message
    assert not (tmp_path / "peft").exists()

    export("--ckpt_path", str(edited), "--format", "merged", "--out", str(tmp_path / "merged"))
    assert "model.norm.weight" in capsys.readouterr().out  # says what it carried
    model = base("olmoe")
    load_adapter(model, olmoe_run["adapters"], expert_kernel="torch")
    with torch.no_grad():
        model.model.norm.weight.copy_(norm * 1.5)
    check_merged(tmp_path / "merged", logits(model, token_batch), token_batch)


def test_sharded_checkpoint_folder_exports(olmoe_run, token_batch, tmp_path):
    """A ModelParallelStrategy checkpoint folder: the whole state dict in torch.distributed.checkpoint shards
    (adapters included) and everything else in meta.pt, laid out as Lightning writes it."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    checkpoint = torch.load(olmoe_run["ckpt"], weights_only=True)
    model = base("olmoe")
    load_adapter(model, olmoe_run["adapters"], expert_kernel="torch")
    expected = logits(model, token_batch)
    folder = tmp_path / "sharded.ckpt"
    folder.mkdir()
    whole = {f"model.{k}": v for k, v in model.state_dict().items()}
    _save_state_dict({"state_dict": whole}, storage_writer=FileSystemWriter(folder), no_dist=True)
    del checkpoint["state_dict"], checkpoint["optimizer_states"]
    torch.save(checkpoint, folder / "meta.pt")

    export("--ckpt_path", str(folder), "--format", "merged", "--out", str(tmp_path / "merged"))
    check_merged(tmp_path / "merged", expected, token_batch)


# -- refusals: one message, status 2, nothing written, and before any model is loaded ------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Refusals must come before a model is built: building one fails the test."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("hellora_pl.export_sources.load_backbone", refuse)


def refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        export(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_refuses_a_non_empty_out_and_changes_nothing(olmoe_run, tmp_path, capsys, no_model_loading):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    err = refused(capsys, "--ckpt_path", str(olmoe_run["ckpt"]), "--format", "peft", "--out", str(out))
    assert "not empty" in err and str(out) in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_without_a_source(tmp_path, capsys, no_model_loading):
    err = refused(capsys, "--format", "peft", "--out", str(tmp_path / "out"))
    assert "--ckpt_path" in err and "--adapter_path" in err and "required" in err
    assert not (tmp_path / "out").exists()


def test_refuses_an_adapter_folder_without_a_backbone_source(olmoe_run, tmp_path, capsys, no_model_loading):
    out = str(tmp_path / "out")
    err = refused(capsys, "--adapter_path", str(olmoe_run["adapters"]), "--format", "merged", "--out", out)
    assert "--config" in err and "--pretrained" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_refuses_missing_paths_and_mismatched_options(olmoe_run, tmp_path, capsys, no_model_loading):
    out = str(tmp_path / "out")
    err = refused(capsys, "--ckpt_path", str(tmp_path / "missing.ckpt"), "--format", "peft", "--out", out)
    assert "missing.ckpt" in err and "does not exist" in err
    err = refused(capsys, "--adapter_path", str(tmp_path), "--pretrained", "x/y", "--format", "peft", "--out", out)
    assert "plan.json" in err
    err = refused(capsys, "--ckpt_path", str(tmp_path), "--format", "peft", "--out", out)
    assert "meta.pt" in err and "not a sharded" in err
    err = refused(capsys, "--ckpt_path", str(olmoe_run["ckpt"]), "--format", "zip", "--out", out)
    assert "invalid choice: 'zip'" in err
    err = refused(capsys, "--ckpt_path", str(olmoe_run["ckpt"]), "--format", "peft", "--dtype", "float16", "--out", out)
    assert "--dtype" in err and "merged" in err
    assert not (tmp_path / "out").exists()


def test_esft_refuses_peft_and_exports_merged(tmp_path, token_batch, capsys):
    """ESFT's full-rank deltas are not LoRA: refused for PEFT (before loading a model), merged exactly."""
    model = base("olmoe")
    plan = build_plan(
        model,
        AllExperts(),
        None,
        rank=4,
        alpha=8.0,
        method="esft",
        expert_adapter="full",
        attention_modules=[],
        shared_expert_modules=[],
    )
    inject_adapters(model, plan, expert_kernel="torch")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "lora_delta" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    expected = logits(model, token_batch)
    save_adapter(tmp_path / "esft", model, plan)
    config = tmp_path / "train.yaml"
    config.write_text(training_yaml("olmoe"))
    source = ["--adapter_path", str(tmp_path / "esft"), "--config", str(config)]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("hellora_pl.export_sources.load_backbone", lambda *_: pytest.fail("loaded a model"))
        err = refused(capsys, *source, "--format", "peft", "--out", str(tmp_path / "peft"))
    assert "'esft'" in err and "--format merged" in err
    assert not (tmp_path / "peft").exists()

    export(*source, "--format", "merged", "--out", str(tmp_path / "merged"))
    check_merged(tmp_path / "merged", expected, token_batch)


def test_a_failed_export_leaves_nothing_behind(olmoe_run, tmp_path, capsys, monkeypatch):
    def fail_midway(model, directory, **_kwargs):
        (Path(directory) / "model.safetensors").write_text("half written")
        raise OSError("No space left on device")

    monkeypatch.setattr("hellora_pl.adapters.export_merged", fail_midway)
    out = tmp_path / "new" / "deeper" / "merged"
    err = refused(capsys, "--ckpt_path", str(olmoe_run["ckpt"]), "--format", "merged", "--out", str(out))
    assert "No space left on device" in err
    assert list(tmp_path.iterdir()) == []  # no staging folder, no parent folders


def test_pretrained_base_and_merged_dtype(olmoe_run, token_batch, tmp_path, capsys):
    """--pretrained loads the base from a folder (for an adapter folder, or instead of the checkpoint's
    source); --dtype casts the merged weights after a merge in the training dtype (fp32 here)."""
    base("olmoe").save_pretrained(tmp_path / "base")
    expected = adapted_logits(olmoe_run, token_batch)
    pretrained = ["--pretrained", str(tmp_path / "base")]
    from_folder = ["--adapter_path", str(olmoe_run["adapters"]), *pretrained]
    export(*from_folder, "--format", "peft", "--out", str(tmp_path / "peft"))
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out  # how to load the base
    check_peft("olmoe", tmp_path / "peft", expected, token_batch)

    for dtype in ("float32", "bfloat16"):
        out = str(tmp_path / dtype)
        export("--ckpt_path", str(olmoe_run["ckpt"]), *pretrained, "--format", "merged", "--dtype", dtype, "--out", out)
    check_merged(tmp_path / "float32", expected, token_batch)
    full = load_file(str(tmp_path / "float32" / "model.safetensors"))
    half = load_file(str(tmp_path / "bfloat16" / "model.safetensors"))
    assert set(full) == set(half) and all(half[k].dtype == torch.bfloat16 for k in half)
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)  # merged in fp32, then cast
