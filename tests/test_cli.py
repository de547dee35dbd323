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
    assert "routing profile" not in output  # the checkpoint's plan is injected, routing is not profiled again


def test_resumed_fit_injects_the_checkpoint_plan_without_profiling(quickstart):
    tmp_path, first_output, run_dir = quickstart
    assert "[hellora] routing profile:" in first_output  # a fresh fit profiles
    (checkpoint,) = (run_dir / "checkpoints").glob("last.ckpt")
    resumed = [arg if arg != "--trainer.max_steps=2" else "--trainer.max_steps=4" for arg in SHORT]
    output = run_cli("fit", "--config", str(REPO / "configs" / "quickstart.yaml"), *resumed,
                     "--ckpt_path", str(checkpoint), cwd=tmp_path)  # fmt: skip
    assert "routing profile" not in output
    first = json.loads((run_dir / "hellora" / "plan.json").read_text())
    (resumed_plan,) = [p for p in (tmp_path / "runs").glob("*/hellora/version_*/hellora/plan.json") if run_dir not in p.parents]
    assert [layer["hot_experts"] for layer in json.loads(resumed_plan.read_text())["layers"]] == [
        layer["hot_experts"] for layer in first["layers"]
    ]


def test_validate_without_a_checkpoint_says_it_evaluates_the_base_model(tmp_path):
    output = run_cli("validate", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.logger=false",
                     "--data.init_args.num_train=64", "--data.init_args.num_val=16", cwd=tmp_path)  # fmt: skip
    assert "evaluates the BASE model, without adapters" in output and "--ckpt_path" in output


def test_fast_dev_run_writes_nothing_and_repeats(tmp_path):
    for _ in range(2):
        output = run_cli("fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.fast_dev_run=true",
                         "--trainer.enable_progress_bar=false", "--data.init_args.num_train=64",
                         "--data.init_args.num_val=16", cwd=tmp_path)  # fmt: skip
        assert "adapted experts" in output
    assert not list(tmp_path.iterdir()), f"fast_dev_run left {list(tmp_path.rglob('*'))}"


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
