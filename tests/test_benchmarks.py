"""The benchmark scripts run end to end on a tiny shape, write their files, and their checks pass.

Why: a benchmark that silently stops running (or times wrong code) is found out only when
someone needs a figure; the smoke runs keep both scripts working and their correctness checks
green, without touching benchmarks/results/.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

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
    for name in ("expert_path", "train_throughput", "_common"):
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
    train_throughput.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    data, markdown = written(tmp_path, "train_throughput_tiny_cpu")

    assert [row["method"] for row in data["rows"]] == ["lora", "hellora", "peft"]
    for row in data["rows"]:
        assert row["ms_median"] > 0 and row["tokens_per_s"] > 0 and row["saved_bytes"] > 0
        assert row["label"] in markdown
    by = {row["method"]: row for row in data["rows"]}
    assert by["hellora"]["trainable_params"] < by["lora"]["trainable_params"] == by["peft"]["trainable_params"]
    assert data["all_checks_passed"], [c for c in data["checks"] if not c["passed"]]
    assert len(data["checks"]) == 3
    assert set(data["summary"]) >= {"hellora_throughput_over_peft", "lora_throughput_over_peft"}
    assert "FAIL" not in markdown
