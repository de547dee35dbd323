"""The CLI end to end, in subprocesses, on the quickstart configs shortened to a few steps."""

import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO

SHORT = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=2",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.num_train=64",
    "--data.init_args.num_val=16",
]


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "hellora_pl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def fit(config, tmp_path):
    output = run_cli("fit", "--config", str(REPO / "configs" / config), *SHORT, cwd=tmp_path)
    (run_dir,) = (tmp_path / "runs").glob("*/hellora/version_0")
    return output, run_dir


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("quickstart")
    output, run_dir = fit("quickstart.yaml", tmp_path)
    return tmp_path, output, run_dir


def test_quickstart_fit_writes_plan_adapters_and_heatmap(quickstart):
    _, output, run_dir = quickstart
    assert "[hellora]   layer 0: adapted experts [" in output
    plan = json.loads((run_dir / "hellora" / "plan.json").read_text())
    assert plan["method"] == "hellora"
    assert all(len(layer["hot_experts"]) == plan["top_k"] for layer in plan["layers"])
    assert (run_dir / "hellora" / "adapter.safetensors").stat().st_size > 0
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert "routing/profile/heatmap" in events.Tags()["images"]
    assert "val/loss" in events.Tags()["scalars"]


def test_validate_from_checkpoint_restores_adapters(quickstart):
    tmp_path, _, run_dir = quickstart
    (checkpoint,) = (run_dir / "checkpoints").glob("last.ckpt")
    output = run_cli(
        "validate",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--ckpt_path",
        str(checkpoint),
        "--trainer.logger=false",
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=16",
        cwd=tmp_path,
    )
    assert "adapted experts" in output and "val/loss" in output


def test_lora_baseline_reports_more_trainable_parameters(quickstart, tmp_path):
    _, _, hellora_dir = quickstart
    _, lora_dir = fit("quickstart_lora.yaml", tmp_path)
    hellora = json.loads((hellora_dir / "hellora" / "plan.json").read_text())
    lora = json.loads((lora_dir / "hellora" / "plan.json").read_text())
    assert lora["method"] == "lora"
    assert lora["trainable_params"] == hellora["lora_all_experts_params"]
    assert lora["trainable_params"] > hellora["trainable_params"]


def test_rerun_into_the_same_log_dir_refuses_to_overwrite(quickstart):
    tmp_path, _, run_dir = quickstart
    written = (run_dir / "hellora" / "plan.json").read_text()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable, "-m", "hellora_pl", "fit",
            "--config", str(REPO / "configs" / "quickstart.yaml"), *SHORT,
            "--trainer.logger.init_args.version=0",
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode != 0
    assert "already exists" in result.stderr or "would be overwritten" in result.stderr
    assert (run_dir / "hellora" / "plan.json").read_text() == written
