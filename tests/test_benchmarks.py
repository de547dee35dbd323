"""The benchmark scripts run end to end on a tiny shape, write their files, and their checks pass.

Why: a benchmark that silently stops running (or times wrong code) is found out only when
someone needs a figure; the smoke runs keep both scripts working and their correctness checks
green, without touching benchmarks/results/.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script as a module (the scripts import their sibling _common)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str):
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    yield load
    scripts = ("expert_path", "train_throughput", "sandbox_timing", "sandbox_overhead", "_sandbox_programs")
    for name in (*scripts, "_common"):
        sys.modules.pop(name, None)


def written(out: Path, stem: str) -> tuple[dict, str]:
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    assert json_path.is_file() and md_path.is_file()
    return json.loads(json_path.read_text()), md_path.read_text()


def test_expert_path_smoke(bench, tmp_path):
    expert_path = bench("expert_path")
    payload = expert_path.main(["--smoke", "--device", "cpu", "--prototypes", "--out", str(tmp_path)])
    data, markdown = written(tmp_path, "expert_path_tiny_cpu")
    assert data == json.loads(json.dumps(payload))

    names = {row["variant"] for row in data["rows"]}
    expected = {
        "frozen base (grouped_mm)",
        "PEFT LoRA, all experts",
        "ours LoRA, all experts",
        "ours HELLoRA, hot only (torch)",
        "ours HELLoRA, hot only (Triton)",
        *expert_path.PROTOTYPES,
    }
    assert expected <= names
    for row in data["rows"]:
        if row["variant"] == "ours HELLoRA, hot only (Triton)":
            assert row["status"].startswith("n/a")  # CPU run: no CUDA
        else:
            assert row["status"] == "ok" and row["ms_median"] > 0 and row["saved_bytes"] >= 0
        assert row["variant"] in markdown

    assert data["all_checks_passed"], [c for c in data["checks"] if not c["passed"]]
    check_names = " ".join(c["name"] for c in data["checks"])
    assert "ours LoRA, all experts == PEFT" in check_names and "HELLoRA, hot only == PEFT" in check_names
    assert "PASS" in markdown and "FAIL" not in markdown
    assert data["machine"]["command"].startswith("python benchmarks/expert_path.py --smoke")


def test_expert_path_hot_share_biases_routing(bench):
    expert_path = bench("expert_path")
    shape = expert_path.SHAPES["cpu"]
    routing = expert_path.make_routing(256, shape, 0.5, 0, torch.device("cpu"), torch.float32)
    assert len(routing.hot_experts) == shape.hot
    assert routing.hot_share == pytest.approx(0.5, abs=0.03)
    plain = expert_path.make_routing(256, shape, None, 0, torch.device("cpu"), torch.float32)
    assert plain.hot_share < 0.3  # i.i.d. logits: about hot / E = 1/8, a little more for the most selected


def test_train_throughput_smoke(bench, tmp_path):
    train_throughput = bench("train_throughput")
    payload = train_throughput.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    data, markdown = written(tmp_path, "train_throughput_tiny_cpu")
    assert data == json.loads(json.dumps(payload))

    assert [row["method"] for row in data["rows"]] == ["attention_only", "lora", "hellora", "peft"]
    by = {row["method"]: row for row in data["rows"]}
    floor_ms = by["attention_only"]["ms_median"]
    for row in data["rows"]:
        assert row["ms_median"] > 0 and row["tokens_per_s"] > 0 and row["saved_bytes"] > 0
        assert row["label"] in markdown
        # Both sides rounded to 3 decimals: the ratio agrees with the medians to that rounding.
        assert row["ratio_to_floor"] == pytest.approx(row["ms_median"] / floor_ms, rel=1e-3, abs=2e-3)
    assert by["attention_only"]["ratio_to_floor"] == 1.0
    assert by["attention_only"]["hot_experts_per_layer"] == [0, 0]
    params = {m: row["trainable_params"] for m, row in by.items()}
    assert params["attention_only"] < params["hellora"] < params["lora"] == params["peft"]
    assert data["all_checks_passed"], [c for c in data["checks"] if not c["passed"]]
    assert len(data["checks"]) == 4
    floor_check = next(c for c in data["checks"] if c["name"].startswith("attention-only LoRA trains only"))
    # tiny: 2 layers x rank 4 x (in + out) of q, k, v, o, all 64 x 64
    assert floor_check["trainable_params"]["counted"] == 2 * 4 * 4 * (64 + 64) == params["attention_only"]
    assert floor_check["outside_attention"] == []
    summary = data["summary"]
    assert set(summary) >= {"hellora_throughput_over_peft", "lora_throughput_over_peft", "hellora_over_floor",
                            "peft_over_floor", "lora_over_floor"}  # fmt: skip
    assert summary["peft_over_floor"] == by["peft"]["ratio_to_floor"]
    assert "x attention-only" in markdown and "PEFT ms / this" in markdown and "FAIL" not in markdown


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--hidden", "100", "--heads", "3"], "3 attention heads do not divide hidden size 100"),
        (["--hidden", "100"], "head dimension 100 / 4 = 25 is odd"),
        (["--tokens", "250"], "--tokens 250 is not a multiple of the batch 4 (the preset's)"),
        (["--tokens", "250", "--seq-len", "100"], "--tokens 250 is not a multiple of --seq-len 100"),
        (["--tokens", "256", "--batch", "4", "--seq-len", "32"], "--tokens 256 != --batch 4 x --seq-len 32"),
        (["--experts", "8", "--top-k", "9"], "--top-k 9 is more than the 8 experts"),
        (["--rank", "0"], "--rank must be a positive integer, got 0"),
    ],
)
def test_train_throughput_refuses_bad_shape_before_building(bench, monkeypatch, capsys, options, message):
    train_throughput = bench("train_throughput")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the options were checked")

    monkeypatch.setattr(train_throughput, "make_model", no_model)
    with pytest.raises(SystemExit) as exit_info:
        train_throughput.main(["--device", "cpu", "--shape", "cpu", *options])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "(base preset: --shape cpu)" in error


def test_train_throughput_custom_shape_reaches_the_model(bench):
    train_throughput = bench("train_throughput")
    argv = ["--shape", "tiny", "--hidden", "32", "--heads", "2", "--intermediate", "24", "--experts", "6",
            "--top-k", "3", "--layers", "1", "--tokens", "12", "--rank", "2"]  # fmt: skip
    args = train_throughput.parse_args(argv)
    setup, base = args.setup, train_throughput.SETUPS["tiny"]
    assert args.custom and (setup.batch, setup.seq_len, setup.rank) == (base.batch, 6, 2)  # the preset's batch 2

    model = train_throughput.make_model(setup, torch.device("cpu"), seed=0)
    (layer,) = model.model.layers
    assert model.config.num_experts == 6 and model.config.num_experts_per_tok == 3
    assert tuple(layer.mlp.gate.weight.shape) == (6, 32)
    assert tuple(layer.mlp.experts.down_proj.shape) == (6, 32, 24)
    batch = train_throughput.make_batch(setup, setup.config["vocab_size"], torch.device("cpu"), seed=1)
    assert tuple(batch["input_ids"].shape) == (2, 6)
    plan = train_throughput.adapt(model, "hellora", batch, setup.rank, "torch")
    assert (plan.num_experts, plan.top_k, plan.rank) == (6, 3, 2)
    assert [len(layer.hot_experts) for layer in plan.layers] == [3]  # HELLoRA keeps top-k experts per layer

    stem = train_throughput.results_stem("tiny", setup, base, args.custom, torch.device("cpu"), None)
    assert stem == "train_throughput_tiny_h32_i24_e6_k3_l1_t12_r2_cpu"
    by_seq = train_throughput.parse_args(["--shape", "tiny", "--tokens", "12", "--seq-len", "3"]).setup
    assert (by_seq.batch, by_seq.seq_len) == (4, 3)
    preset = train_throughput.parse_args(["--shape", "tiny"])
    assert not preset.custom and preset.setup == base


def test_sandbox_timing_smoke(bench, tmp_path, shared_data):
    sandbox_timing = bench("sandbox_timing")
    payload = sandbox_timing.main(["--smoke", "--data", str(shared_data), "--out", str(tmp_path)])
    data, markdown = written(tmp_path, "sandbox_timing")
    assert data == json.loads(json.dumps(payload))

    assert [run["workers"] for run in data["runs"]] == [1, 2]
    for run in data["runs"]:
        assert set(run["benchmarks"]) == {"humaneval", "mbpp"}
        for name, b in run["benchmarks"].items():
            assert b["programs"] == b["passed"] == 3 and b["timeouts"] == 0 and b["not_passed"] == {}
            durations = b["durations_s"]
            assert len(durations) == 3 and min(durations.values()) > 0
            assert b["max_s"] == max(durations.values()) == b["slowest"][0][1]
            assert 0 < b["p50"] <= b["p90"] <= b["p99"] <= b["max_s"]
        every = {task: s for b in run["benchmarks"].values() for task, s in b["durations_s"].items()}
        # Durations are rounded to ms, so two programs can tie: the named one must have the maximum.
        task, seconds = run["slowest"]
        assert seconds == max(every.values()) and every[task] == seconds
    two_workers = data["runs"][1]["slowest"][1]
    assert data["margin"] == 4.5 and data["suggested_timeout_s"] == math.ceil(two_workers * 4.5)
    assert f"Suggested default timeout: {data['suggested_timeout_s']} s" in markdown
    assert "uptime before" in markdown and data["uptime_before"]


def test_sandbox_overhead_smoke_never_runs_a_missing_layer_as_another_mode(bench, tmp_path, shared_data, monkeypatch):
    sandbox_overhead = bench("sandbox_overhead")
    missing = sandbox_overhead.Mode("needs a layer this sandbox lacks", "all", required=("no-such-layer",))
    monkeypatch.setattr(sandbox_overhead, "MODES", (*sandbox_overhead.MODES, missing))
    sandbox_overhead.main(["--smoke", "--data", str(shared_data), "--out", str(tmp_path)])
    data, markdown = written(tmp_path, "sandbox_overhead")

    modes = data["modes"]
    assert modes[missing.name].startswith("not available: the sandbox has no layer named ['no-such-layer']")
    assert modes[sandbox_overhead.BASELINE] == modes["sandbox without bubblewrap (own layers)"] == "ok"
    assert modes["sandbox with bubblewrap"] == "ok" or modes["sandbox with bubblewrap"].startswith("not available")
    rows = {(r["mode"], r["workers"]): r for r in data["rows"]}
    assert len(rows) == 2 * len(modes)
    for (mode, workers), row in rows.items():
        if modes[mode] != "ok":
            assert "total_s" not in row  # never timed as some other mode
            continue
        assert row["passed"] == "4/4" and row["total_s"] > 0 and row["per_program_mean_ms"] > 0
        if mode == sandbox_overhead.BASELINE:
            assert row["total_over_baseline"] == 1.0 and row["layers_held"] == [""]
        elif mode == "sandbox with bubblewrap":
            assert all("bwrap" in held.split(", ") for held in row["layers_held"])
        else:
            assert not any("bwrap" in held.split(", ") for held in row["layers_held"])
    assert missing.name in markdown and "x baseline" in markdown


def test_sandbox_overhead_mode_whose_layer_does_not_hold_is_not_available(bench, monkeypatch):
    """A layer the sandbox names but that did not hold on this machine makes its mode unavailable."""
    sandbox_overhead = bench("sandbox_overhead")
    sandbox = sandbox_overhead.sandbox
    held_nothing = SimpleNamespace(passed=True, status="passed", reason="passed", isolation=("rlimits", "session"))
    monkeypatch.setattr(sandbox, "run_program", lambda source, limits, layers=None: held_nothing)
    layer = sandbox.OPTIONAL_LAYERS[0]
    mode = sandbox_overhead.Mode("needs one layer", "all", required=(layer,))
    state = sandbox_overhead.availability(mode, sandbox.SandboxLimits())
    assert state == f"not available: layer(s) ['{layer}'] did not hold on this machine (held: ['rlimits', 'session'])"
