"""benchmarks/gpu_suite.py: its plan and argument checks on CPU, and a tiny end-to-end run under Triton's interpreter.

Why: the suite exists for the rare hours a GPU machine is lent; it must not fail there on a bad
argument, a renamed field or a hung step. Here it runs every step at tiny shapes on CPU (the
kernel tests interpreted), which exercises the same code the GPU run uses, figures included.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO

SUITE = REPO / "benchmarks" / "gpu_suite.py"


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    """main() puts benchmarks/ and the checkout on sys.path; keep that out of other tests."""
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_suite", None)


def test_dry_run_prints_every_step_with_its_budget_and_writes_nothing(suite, tmp_path, capsys):
    out = tmp_path / "out"
    assert suite.main(["--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for step in suite.STEPS:
        assert f"{step} (budget {suite.STEP_BUDGETS['full'][step]} s" in printed
    assert f"total budget {suite.TOTAL_BUDGET['full']} s" in printed
    assert "tests/test_triton_kernels.py tests/test_triton_nf4.py" in printed
    assert "expert_path.main(['--shape', 'olmoe'" in printed and "expert_path.main(['--shape', 'mixtral'" in printed
    # train_throughput at OLMoE-1B-7B sizes, fewer layers
    assert "'--hidden', '2048', '--intermediate', '1024', '--experts', '64', '--top-k', '8', '--layers', '4'" in printed
    assert "method='hellora'" in printed and "method='lora'" in printed
    assert not out.exists()
    assert sum(suite.STEP_BUDGETS["full"].values()) <= suite.TOTAL_BUDGET["full"] <= 8 * 60


def test_dry_run_steps_subset_in_run_order(suite, tmp_path, capsys):
    argv = ["--dry-run", "--tiny", "--out", str(tmp_path), "--steps", "memory", "kernel_tests"]
    assert suite.main([*argv, "--step-budget", "kernel_tests=300"]) == 0
    printed = capsys.readouterr().out
    assert "1. kernel_tests (budget 300 s" in printed and "2. memory (budget 60 s" in printed
    assert "expert_path" not in printed
    assert f"-k '{suite.TINY_KERNEL_TESTS}'" in printed


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--steps", "kernel_tests", "warp_drive"], "unknown step 'warp_drive'"),
        (["--budget", "0"], "--budget must be more than 0 seconds, got 0"),
        (["--budget", "-5"], "--budget must be more than 0 seconds, got -5"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--warmup", "-1"], "--warmup must be at least 0"),
        (["--step-budget", "memory=0"], "--step-budget 'memory=0': a step's budget must be more than 0 seconds"),
        (["--step-budget", "gpu=60"], "--step-budget 'gpu=60': unknown step 'gpu'"),
    ],
)
def test_bad_arguments_exit_2_naming_the_problem_before_writing(suite, tmp_path, capsys, extra, expected):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--dry-run", "--out", str(out), *extra])
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_out_that_is_a_file_is_refused(suite, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--dry-run", "--out", str(target)])
    assert exit_.value.code == 2
    assert f"--out {target} is a file" in capsys.readouterr().err
    assert target.read_text() == "keep me\n"


def test_existing_results_are_refused_without_force(suite, tmp_path, capsys):
    (tmp_path / "gpu_suite.md").write_text("old\n")
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--tiny", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "already holds gpu_suite.md; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_suite.md"]
    assert suite.main(["--dry-run", "--force", "--out", str(tmp_path)]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_a_full_run_is_refused(suite, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert suite.NO_CUDA in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_spent_budget_skips_the_remaining_steps_with_the_reason(suite, tmp_path):
    assert suite.main(["--tiny", "--out", str(tmp_path), "--budget", "1"]) == 1  # below MIN_STEP_SECONDS
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [s["name"] for s in report["steps"]] == list(suite.STEPS)
    assert {s["status"] for s in report["steps"]} == {"skipped"}
    assert all("total budget spent" in s["reason"] for s in report["steps"])
    assert not report["all_ok"]
    assert "| memory | skipped |" in (tmp_path / "gpu_suite.md").read_text()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_step_past_its_budget_is_killed_with_its_children(suite, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    rc, seconds = suite.run_bounded([sys.executable, "-c", script], 3, tmp_path / "log.txt", dict(os.environ))
    assert rc is None and 3 <= seconds < 20
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_junit_failures_make_the_kernel_step_fail_and_are_named(suite, tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_triton_kernels" name="test_a"/>'
        '<testcase classname="tests.test_triton_kernels" name="test_b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_triton_nf4" name="test_c"><skipped message="no bitsandbytes"/></testcase>'
        '<testcase classname="tests.test_triton_kernels" name="test_d"/>'
        "</testsuite></testsuites>"
    )
    result = suite.kernel_test_result(junit, 1, tmp_path / "log.txt")
    assert result.status == "failed"
    assert result.figures["passed"] == 2 and result.figures["failed"] == 1 and result.figures["skipped"] == 1
    assert result.figures["failed_tests"] == ["tests.test_triton_kernels::test_b"]
    assert result.figures["skip_reasons"] == ["no bitsandbytes"]
    assert suite.kernel_test_result(junit, 0, tmp_path / "log.txt").status == "failed"  # rc 0 cannot hide a failure


def test_a_missing_benchmark_field_is_named(suite):
    with pytest.raises(KeyError, match="row 'peft' has no 'ratio_to_floor'"):
        suite.required({"method": "peft", "ms_median": 1.0}, ("ms_median", "ratio_to_floor"), "train_throughput")


def test_tiny_run_end_to_end_under_the_interpreter(tmp_path):
    """Every step in its own process at tiny shapes on CPU: statuses, versions and figures in one JSON."""
    pytest.importorskip("triton")
    pytest.importorskip("peft")
    out = tmp_path / "suite"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SUITE), "--tiny", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["kernel_tests", "expert_path", "train_throughput", "memory"]
    assert steps["kernel_tests"]["status"] == "passed"
    assert {steps[name]["status"] for name in ("expert_path", "train_throughput", "memory")} == {"measured"}
    assert all(0 < s["seconds"] <= s["budget_s"] for s in report["steps"])
    env_report = report["environment"]
    for package in ("torch", "triton", "transformers", "peft"):
        assert env_report[package], package
    assert env_report["device"].startswith("CPU") and env_report["TRITON_INTERPRET"] == "1"

    kernels = steps["kernel_tests"]["figures"]
    assert kernels["failed"] == 0 and kernels["errors"] == 0 and kernels["passed"] >= 2
    assert kernels["passed"] + kernels["skipped"] == 3  # the -k selection: 3 nodes
    tiny = steps["expert_path"]["figures"]["tiny"]
    assert tiny["all_checks_passed"] and tiny["variants"]["frozen base (grouped_mm)"]["ratio_to_base"] == 1.0
    assert tiny["variants"]["ours HELLoRA, hot only (Triton)"] == {"status": "n/a (no CUDA)"}
    methods = steps["train_throughput"]["figures"]["methods"]
    assert set(methods) == {"attention_only", "lora", "hellora", "peft"}
    assert methods["attention_only"]["ratio_to_floor"] == 1.0
    assert all(m["ratio_to_floor"] > 0 and m["ms_median"] > 0 for m in methods.values())
    memory = steps["memory"]["figures"]
    assert [c["method"] for c in memory["configs"]] == ["hellora", "lora"]
    for config in memory["configs"]:
        # on CPU: no allocator peak (stated, not faked); weights, adapters exact; activations as test_memory's 0.5 %
        assert config["measured_peak_bytes"] is None and config["peak_ratio"] is None
        assert config["trainable_predicted"] == config["trainable_counted"] > 0
        assert config["measured_weight_bytes"] == config["predicted_weight_bytes"]
        assert config["measured_adapter_bytes"] == config["predicted_adapter_bytes"]
        assert config["activation_ratio"] == pytest.approx(1.0, abs=0.005)
    assert "no CUDA allocator statistics" in memory["peak_not_measured"]
    # LoRA on every expert holds more than HELLoRA on the hot ones
    assert memory["configs"][1]["predicted_adapter_bytes"] > memory["configs"][0]["predicted_adapter_bytes"]

    markdown = (out / "gpu_suite.md").read_text()
    for name in steps:
        assert f"| {name} | {steps[name]['status']} |" in markdown
    assert f"triton {env_report['triton']}" in markdown and f"transformers {env_report['transformers']}" in markdown
    assert (out / "steps" / "expert_path" / "expert_path_tiny_cpu.json").is_file()
    assert any(p.name.startswith("train_throughput_tiny") for p in (out / "steps" / "train_throughput").iterdir())
    assert not list((REPO / "benchmarks" / "results").glob("*_tiny_*"))  # the steps' files stay under --out
