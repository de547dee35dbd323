"""Every mistake the config allows is refused first: one short message with the fix, before any
model work, routing profile or folder (issue: fail fast)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from hellora_pl.cli import main

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
TWIN = str(REPO / "configs" / "tiny" / "olmoe" / "hellora_math.yaml")
SMALL = ["--data.init_args.num_train=64", "--data.init_args.num_val=16"]


def refuse(args, capfd, tmp_path, monkeypatch):
    """Run the CLI in-process from an empty folder; return its output lines and the folder's entries."""
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip() and "Warning" not in line]
    created = set(tmp_path.rglob("*")) - before
    assert not created, f"a refused run left {sorted(map(str, created))}"
    assert "Traceback" not in out + err
    return lines


def first_lines(lines, n=5):
    return "\n".join(lines[:n])


def test_misspelt_key_in_a_config_file(capfd, tmp_path, monkeypatch):
    typo = tmp_path / "typo.yaml"
    typo.write_text("hellora:\n  rnak: 4\n")
    lines = refuse(["--config", QUICKSTART, "--config", str(typo)], capfd, tmp_path, monkeypatch)
    head = first_lines(lines)
    assert "hellora.rnak" in head and "Did you mean --hellora.rank?" in head


def test_misspelt_flag(capfd, tmp_path, monkeypatch):
    lines = refuse(["--config", QUICKSTART, "--trainer.max_step", "3"], capfd, tmp_path, monkeypatch)
    assert "Did you mean --trainer.max_steps?" in first_lines(lines)


def test_unknown_method_lists_the_methods(capfd, tmp_path, monkeypatch):
    lines = refuse(["--config", QUICKSTART, "--hellora.method", "lorra"], capfd, tmp_path, monkeypatch)
    head = first_lines(lines)
    assert "--hellora.method lorra is not one of" in head and "'hellora'" in head and "'dr_lora'" in head


def test_k_larger_than_the_number_of_experts(capfd, tmp_path, monkeypatch):
    args = ["--config", QUICKSTART, "--hellora.hot_experts", "TopKPerLayer", "--hellora.hot_experts.k", "40", *SMALL]
    lines = refuse(args, capfd, tmp_path, monkeypatch)
    head = first_lines(lines)
    assert "k=40 is larger than the number of experts (32)" in head and "choose k <= 32" in head
    assert not any("routing profile" in line for line in lines)  # refused before profiling


def test_rank_zero(capfd, tmp_path, monkeypatch):
    lines = refuse(["--config", QUICKSTART, "--hellora.rank", "0"], capfd, tmp_path, monkeypatch)
    assert "rank must be a positive integer, got 0" in first_lines(lines)


def test_missing_data_file(capfd, tmp_path, monkeypatch):
    args = ["--config", TWIN, "--data.init_args.train.path", "missing/train.jsonl"]
    lines = refuse(args, capfd, tmp_path, monkeypatch)
    head = first_lines(lines)
    assert "missing/train.jsonl" in head and "does not exist" in head and "Fix:" in head


def test_existing_plan_json_is_not_overwritten(capfd, tmp_path, monkeypatch):
    plan = tmp_path / "runs" / "quickstart" / "hellora" / "version_0" / "hellora" / "plan.json"
    plan.parent.mkdir(parents=True)
    plan.write_text('{"written": "earlier"}')
    args = ["--config", QUICKSTART, "--trainer.logger.init_args.version=0", *SMALL]
    lines = refuse(args, capfd, tmp_path, monkeypatch)
    head = first_lines(lines)
    assert "plan.json exists from an earlier run" in head and "--hellora.overwrite true" in head
    assert plan.read_text() == '{"written": "earlier"}'
    assert not any("routing profile" in line for line in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU, so accelerator=gpu is valid here")
def test_gpu_accelerator_with_a_cpu_build_of_torch(capfd, tmp_path, monkeypatch):
    lines = refuse(["--config", QUICKSTART, "--trainer.accelerator", "gpu"], capfd, tmp_path, monkeypatch)
    head = first_lines(lines)
    assert "needs a GPU" in head and "--trainer.accelerator cpu" in head


def test_companion_settings_for_a_method_that_ignores_them(capfd, tmp_path, monkeypatch):
    lines = refuse(["--config", QUICKSTART, "--lori.density", "0.3"], capfd, tmp_path, monkeypatch)
    assert "method 'hellora' does not use LoRIMaskCallback" in first_lines(lines)


def test_method_callbacks_under_trainer_callbacks_are_refused(capfd, tmp_path, monkeypatch):
    old_style = tmp_path / "old.yaml"
    old_style.write_text("trainer:\n  callbacks:\n  - class_path: hellora_pl.HotExpertInjectionCallback\n")
    lines = refuse(["--config", QUICKSTART, "--config", str(old_style)], capfd, tmp_path, monkeypatch)
    assert "move its init_args there" in first_lines(lines)


def test_the_entry_point_prints_the_same_short_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "hellora_pl", "fit", "--config", QUICKSTART, "--hellora.method", "lorra"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if "Warning" not in line]
    assert lines[0].startswith("python -m hellora_pl fit: error: --hellora.method lorra is not one of")
    assert not list(tmp_path.iterdir())
