"""The compile gate (benchmarks/compile_gate.py) compiles real launches for a GPU target, fails on a broken kernel,
flags autotune keys that one tuned config would serve for different constexprs, and refuses bad input.

Why: CI has no GPU; this gate is what tells a kernel change that no longer compiles for sm_90 (or spills, or
shares a tuned config it should not) before anyone runs it on a GPU. The runs go through a subprocess without
TRITON_INTERPRET: triton_jit picks its CUDA configs when imported, and this test process may have the interpreter on.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from triton.runtime.jit import JITFunction  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
GATE = BENCHMARKS / "compile_gate.py"
# One shape, one dtype, one target, one kernel, no key-check capture: about 15 s on 2 shared cores.
# _grouped_gemm_kernel's LoRA expand dots over BLOCK_R (its K), so a 4-wide rank tile breaks it.
TINY = ["--quick", "--cc", "90", "--kernel", "_grouped_gemm_kernel", "--key-check-tokens", "", "--jobs", "2"]


def _ptxas() -> str | None:
    try:
        return triton.knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001 - triton raises its own error types when the tool is missing
        return None


needs_ptxas = pytest.mark.skipif(_ptxas() is None, reason="the gate cannot find ptxas (it ships in triton's wheel)")


@pytest.fixture
def gate(monkeypatch):
    """The gate as a module, for its pure parts (parsing, the autotune key); never its `main` in-process."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("compile_gate", None)
    yield importlib.import_module("compile_gate")
    sys.modules.pop("compile_gate", None)


def run_gate(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        [sys.executable, str(GATE), *args], env=environ, capture_output=True, text=True, timeout=300, check=False
    )


@needs_ptxas
def test_tiny_run_compiles_and_reports_registers_and_shared_memory(tmp_path):
    done = run_gate([*TINY, "--out", str(tmp_path)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "compile_gate.json").read_text())
    assert data["summary"]["result"] == "PASS"
    compiled = [row for row in data["rows"] if not row.get("pruned")]
    assert compiled and data["summary"]["variants_compiled"] == len(compiled)
    for row in compiled:
        assert row["kernel"] == "_grouped_gemm_kernel" and row["cc"] == 90
        assert row["error"] is None and row["status"] != ""
        assert 0 < row["registers"] <= 255
        assert 0 < row["shared"] <= row["limit"] == 232_448
        assert "R16" in row["constexprs"] and "M64" in row["constexprs"]  # rank 16, 4096 tokens at OLMoE shape
        assert row["uses"] == ["bf16/train"] and row["shapes"] == ["olmoe-1b-7b"]
    markdown = (tmp_path / "compile_gate.md").read_text()
    assert "| kernel | shape | cc |" in markdown and "**PASS**" in markdown


@needs_ptxas
def test_a_broken_rank_tile_fails_the_gate_and_names_the_compile_error(tmp_path):
    done = run_gate([*TINY, "--out", str(tmp_path)], HELLORA_GATE_BREAK_RANK_BLOCK="4")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "COMPILE ERROR" in done.stdout and "K >=" in done.stdout  # tl.dot's minimum K, as triton words it
    summary = json.loads((tmp_path / "compile_gate.json").read_text())["summary"]
    assert summary["result"] == "FAIL" and summary["compile_errors"] == summary["variants_compiled"] > 0


_CONFIGS = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]


def _toy(x_ptr, n, KEYED: tl.constexpr, FREE: tl.constexpr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.full((BLOCK,), KEYED + FREE, tl.float32), mask=tl.arange(0, BLOCK) < n)


# JITFunction itself, not triton.jit: under TRITON_INTERPRET=1 (set by other test modules) triton.jit gives an
# interpreted function, and the gate reads a compiled kernel's parameters.
_toy_kernel = triton.autotune(configs=_CONFIGS, key=["n", "KEYED"])(JITFunction(_toy))


def _launch(gate, x, n, shape="s", **constexprs):
    return gate.Launch(
        kernel="_toy_kernel", shape=shape, use="bf16/train", tokens=n,
        key=gate.autotune_key(_toy_kernel, (x, n), constexprs),
        constexprs=gate.launch_constexprs(_toy_kernel.fn, (x, n), constexprs),
    )  # fmt: skip


def test_key_collisions_flag_a_constexpr_left_out_of_the_key_only(gate):
    x = torch.zeros(64)
    base = _launch(gate, x, 64, KEYED=1, FREE=0)
    assert base.constexprs == {"KEYED": 1, "FREE": 0}
    found = gate.key_collisions([base, _launch(gate, x, 64, KEYED=1, FREE=1)])
    assert len(found) == 1 and "FREE" in found[0] and "KEYED" not in found[0].split("(")[1].split(")")[0]
    # Keyed constexpr, keyed size, a different tensor dtype or another model shape: separate tuned entries.
    assert gate.key_collisions([base, _launch(gate, x, 64, KEYED=2, FREE=1)]) == []
    assert gate.key_collisions([base, _launch(gate, x, 32, KEYED=1, FREE=1)]) == []
    assert gate.key_collisions([base, _launch(gate, x.half(), 64, KEYED=1, FREE=1)]) == []
    assert gate.key_collisions([base, _launch(gate, x, 64, shape="t", KEYED=1, FREE=1)]) == []


def test_autotune_key_is_the_entry_the_installed_triton_reads(gate, monkeypatch):
    """Seed the tuner's cache under the gate's key: Autotuner.run must find it (a miss would benchmark, on a GPU)."""
    x = torch.zeros(64)
    seen = []
    monkeypatch.setattr(
        _toy_kernel, "cache", {gate.autotune_key(_toy_kernel, (x, 64), {"KEYED": 1, "FREE": 0}): _CONFIGS[1]}
    )
    monkeypatch.setattr(_toy_kernel.fn, "run", lambda *args, **kwargs: seen.append(kwargs["BLOCK"]))
    monkeypatch.setattr(
        _toy_kernel, "_bench", lambda *a, **k: pytest.fail("cache miss: the gate's key is not triton's")
    )
    _toy_kernel[(1,)](x, 64, KEYED=1, FREE=0)
    assert seen == [32] and len(_toy_kernel.cache) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shape", "olmoe"], "unknown model shape"),
        (["--cc", "75"], "unknown target"),
        (["--cc", "sm90"], "whole numbers"),
        (["--jobs", "0"], "--jobs 0: must be at least 1"),
        (["--dtypes", "int8"], "unknown dtype"),
        (["--tokens", "0"], "at least 1"),
        (["--fail-on-spill", "fp8"], "unknown dtype"),
    ],
)
def test_bad_input_is_refused_before_any_work(gate, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        gate.parse_args(["--quick", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_out_must_be_an_existing_directory(gate, capsys, tmp_path):
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("")
    with pytest.raises(SystemExit):
        gate.parse_args(["--quick", "--out", str(not_a_dir)])
    assert "not an existing directory" in capsys.readouterr().err
    assert gate.parse_args(["--quick", "--out", str(tmp_path)]).out == str(tmp_path)


def test_auto_tokens_make_the_launcher_pick_every_block_m(gate, monkeypatch):
    from hellora_pl.kernels.triton_host import _block_m

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter's blocks are always 16 rows

    for experts, top_k in ((64, 8), (8, 2), (256, 8), (128, 1)):
        picked = [_block_m(tokens * top_k, experts) for tokens in gate.auto_tokens(experts, top_k)]
        assert picked == [64, 32, 16], (experts, top_k, picked)


def test_quick_and_full_defaults(gate):
    quick = gate.parse_args(["--quick"])
    assert (quick.shapes, quick.dtype_list, quick.mode_list, quick.ccs, quick.token_list, quick.out) == (
        ["olmoe-1b-7b"],
        ["bf16"],
        ["train"],
        [90, 80],
        [4096],
        None,
    )
    full = gate.parse_args([])
    assert full.shapes == ["olmoe-1b-7b", "mixtral-8x7b", "qwen3.6-35b-a3b"] and full.ccs == [90, 80, 89]
    assert full.token_list is None and full.spill_fails == ["bf16", "fp16"]  # auto: per shape, below
    assert gate.auto_tokens(64, 8) == [4096, 192, 64]  # OLMoE-1B-7B: 64 experts, top-8
    assert Path(full.out) == BENCHMARKS / "results"
    assert gate.parse_args(["--fail-on-spill", "fp32"]).spill_fails == ["bf16", "fp16", "fp32"]


def _ptxas_result(registers=64, spills=0, shared=16_384, error=None) -> dict:
    return {"registers": registers, "spill_stores": spills, "spill_loads": spills, "shared": shared, "error": error,
            "ptxas": ""}  # fmt: skip


def test_checks_fail_on_spills_in_training_shared_memory_grids_errors_and_unfit_launches(gate):
    """The gate's verdicts on synthetic compile results (one launch and one variant per case)."""
    cases = {  # name: (use, grid, result, unfit targets)
        "ok": ("bf16/train", (8, 4, 1), _ptxas_result(), []),
        "bf16_spill": ("bf16/train", (8, 4, 1), _ptxas_result(255, spills=16), []),
        "fp16_spill": ("fp16/train", (8, 4, 1), _ptxas_result(255, spills=4), []),
        "fp32_spill": ("fp32/train", (8, 4, 1), _ptxas_result(255, spills=16), []),
        "eval_spill": ("bf16/eval", (8, 4, 1), _ptxas_result(255, spills=16), []),
        "over_shared": ("bf16/train", (8, 4, 1), _ptxas_result(shared=232_449), []),
        "grid_y": ("bf16/train", (8, 65_536, 1), _ptxas_result(), []),
        "grid_zero": ("bf16/train", (0, 4, 1), _ptxas_result(), []),
        "error": ("bf16/train", (8, 4, 1), _ptxas_result(None, None, None, error="CompilationError: K >= 16"), []),
        "unfit": ("bf16/train", (8, 4, 1), _ptxas_result(), [89]),
    }
    launches, results = [], {}
    for i, (use, grid, result, unfit) in enumerate(cases.values()):  # BLOCK_N tells the cases apart
        spec = gate.Spec("_k", 90, {}, {}, {}, {}, {"BLOCK_N": i}, 4, 3, grid)
        launch = gate.Launch("_k", "olmoe-1b-7b", use, 4096, None, {"BLOCK_N": i}, variants=[(90, spec)], unfit=unfit)
        launches.append(launch)
        results[spec.identity()] = {**result, "seconds": 0.1}

    def verdicts(spill_fails):
        rows, failures = gate.build_rows(launches, results, spill_fails)
        failed = {r["constexprs"] for r in rows if r["failed"]}
        return {name for i, name in enumerate(cases) if f"N{i}" in failed}, failures

    failed, failures = verdicts(["bf16", "fp16"])
    assert failed == {"bf16_spill", "fp16_spill", "over_shared", "grid_y", "grid_zero", "error"}
    assert sum("no autotune config fits sm_89" in f for f in failures) == 1  # the unfit launch, not a row
    assert len(failures) == len(failed) + 1
    failed, _ = verdicts(["bf16", "fp16", "fp32"])
    assert "fp32_spill" in failed and "eval_spill" not in failed
