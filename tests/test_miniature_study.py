"""benchmarks/miniature_study.py (issue 17): the study's task data, a CI-sized run of every task on a
stand-in miniature (built by pretrain_miniature with a tiny recipe), its rows and columns, resuming,
and bad options refused before any training."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import miniature_study as study  # noqa: E402
import pretrain_miniature  # noqa: E402

from hellora_pl.datamodules.arithmetic import generate_arithmetic_problems  # noqa: E402
from hellora_pl.evaluation.code import load_mbpp  # noqa: E402
from hellora_pl.evaluation.sandbox import run_programs  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TINY_RECIPE = ["--steps", "2", "--layers", "1", "--experts", "4", "--top-k", "2", "--hidden", "32", "--heads", "2",
               "--expert-width", "16", "--vocab", "320", "--val-windows", "2", "--seq", "32", "--batch", "2",
               "--threads", "1", "--save-every", "2", "--log-every", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A stand-in miniature: the real pretraining script, a tiny recipe, small stand-in sources."""
    root = tmp_path_factory.mktemp("miniature")
    gsm8k, stdlib, docs = root / "gsm8k", root / "stdlib", root / "docs"
    for folder in (gsm8k, stdlib, docs):
        folder.mkdir()
    problems = generate_arithmetic_problems(400, seed=3)
    gsm8k.joinpath("train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    # tests/test_miniature.py's stand-ins: each domain keeps some held-out documents (split by name)
    modules = ["os", "glob", "fnmatch", "textwrap", "shlex", "bisect", "heapq", "string", "colorsys", "keyword", "abc", "copy"]  # fmt: skip
    for name in modules:
        stdlib.joinpath(f"{name}.py").write_text((STDLIB / f"{name}.py").read_text())
        docs.joinpath(f"{name}.rst.txt").write_text(f"{name}\n=====\n\n{__import__(name).__doc__ or name}\n")
    threads = torch.get_num_threads()
    argv = ["--gsm8k", str(gsm8k), "--stdlib", str(stdlib), "--python-docs", str(docs)]
    try:
        assert (
            pretrain_miniature.main([*argv, "--out", str(root / "model"), "--work", str(root / "work"), *TINY_RECIPE])
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    return root / "model"


def run_study(*argv: str) -> int:
    threads = torch.get_num_threads()
    try:
        return study.main(["--smoke", "--threads", "1", *argv])
    finally:
        torch.set_num_threads(threads)


def test_task_data_is_seeded_held_out_and_its_references_pass(tmp_path):
    train, test = study.arithmetic_split(300, 40)
    assert not {p["question"] for p in train} & {p["question"] for p in test} and len(test) == 40
    assert study.arithmetic_split(300, 40) == (train, test)
    code_train, code_test = study.code_split(48)
    names = lambda rows: {r["code"].split("(")[0] for r in rows}  # noqa: E731
    assert not names(code_train) & names(code_test) and len(code_test) == 48
    files = study.prepare_data(tmp_path, study.SMOKE, tmp_path / "no-safety", ["math", "code"])
    mbpp = str(files["code"]["mbpp"])
    assert [r["task_id"] for r in load_mbpp(mbpp, "test")] == [11, 12, 13]  # MBPP's test ids, what CodeTask reads
    assert len(load_mbpp(mbpp, "train")) == len(study._functions()) - 3
    # Every reference solution passes its own asserts in the project's sandbox (so pass@1 can reach 1).
    rows = code_train + code_test
    results = run_programs([r["code"] + "\n\n" + "\n".join(r["test_list"]) + "\n" for r in rows[:40]], workers=2)
    assert all(r.passed for r in results), [r.reason for r in results if not r.passed][:3]
    wrong = run_programs([rows[0]["code"].replace("return ", "return -") + "\n" + "\n".join(rows[0]["test_list"])])
    assert not wrong[0].passed


def test_benign_instructions_are_held_out_from_the_safety_training_mix():
    math_train, math_test = study.arithmetic_split(100, 12)
    code_train, code_test = study.code_split(12)
    general = study.safety_benign(math_train, code_train, 60)
    benign = study.safety_benign(math_test, code_test, 24, split="test")
    assert not {r["instruction"] for r in general} & {r["instruction"] for r in benign}
    assert {r["category"] for r in benign} == {"arithmetic", "code", "python_questions"}
    assert len({r["instruction"] for r in benign}) == 24  # no instruction asked twice


def test_smoke_study_writes_rows_and_resumes(tiny_model, tmp_path, capsys):
    tasks = ["math", "code"] + (["safety"] if SHARED_DATA.joinpath("safety").is_dir() else [])
    out = tmp_path / "results"
    model = ["--model", str(tiny_model), "--out", str(out)]
    assert run_study(*model, "--tasks", *tasks, "--methods", "random_experts", "--seeds", "0") == 0
    payload = json.loads((out / "miniature_study.json").read_text())
    assert sorted(payload["runs"]) == sorted(f"{t}/random_experts/0" for t in tasks)
    run = payload["runs"]["math/random_experts/0"]
    assert run["policy"] == {"name": "random", "k": None, "seed": 0}
    assert [len(layer) for layer in run["hot_experts"]] == [2]  # as many as HELLoRA: the routing top-k
    assert run["trainable_params"] > 0 and run["adapter_flops_per_token"] > 0 and run["tokens_per_s"] > 0
    assert 0.0 < run["adapted_selection_share"] < 1.0
    assert set(run["val_loss_after"]) == {"math", "code", "prose"}
    assert set(payload["base"]["val_loss"]) == {"math", "code", "prose"}
    for task in tasks:
        metrics = payload["runs"][f"{task}/random_experts/0"]["test_metrics"]
        for name, _ in study.SCORES[task]:
            assert 0.0 <= metrics[name] <= 1.0, (task, name)
    assert [(r["task"], r["method"]) for r in payload["rows"]] == [(t, "random_experts") for t in tasks]
    row = payload["rows"][0]
    change = run["val_loss_after"]["code"] - payload["base"]["val_loss"]["code"]
    assert row["forgetting_code"] == pytest.approx(change, abs=1e-9)
    assert row["forgetting_other"] == pytest.approx(
        (change + run["val_loss_after"]["prose"] - payload["base"]["val_loss"]["prose"]) / 2, abs=1e-9
    )
    assert "params_pct_of_lora" not in row  # no LoRA run yet

    # Again, with LoRA and HELLoRA on math: the finished run is kept, the new ones run, ratios appear.
    kept = payload["runs"]["math/random_experts/0"]
    capsys.readouterr()
    methods = ["lora", "hellora", "moe_sieve", "random_experts"]
    assert run_study(*model, "--tasks", "math", "--methods", *methods, "--seeds", "0", "--jobs", "2") == 0
    assert "math/random_experts/0: kept from an earlier run" in capsys.readouterr().out
    payload = json.loads((out / "miniature_study.json").read_text())
    assert payload["runs"]["math/random_experts/0"] == kept
    assert len(payload["runs"]) == len(tasks) + 3
    sieve = payload["runs"]["math/moe_sieve/0"]
    assert sieve["policy"] == {"name": "fraction", "fraction": 0.25} and sieve["hot_experts"] == [
        [sieve["hot_experts"][0][0]]
    ]
    rows = {(r["task"], r["method"]): r for r in payload["rows"]}
    lora, hellora, random_ = rows["math", "lora"], rows["math", "hellora"], rows["math", "random_experts"]
    assert lora["params_pct_of_lora"] == pytest.approx(100.0) and lora["throughput_vs_lora"] == pytest.approx(1.0)
    assert lora["strict_minus_lora"] == 0.0 and lora["flops_pct_of_lora"] == pytest.approx(100.0)
    assert hellora["params_pct_of_lora"] < 100.0 and hellora["flops_pct_of_lora"] < 100.0
    assert random_["trainable_params"] == hellora["trainable_params"]  # the same count of experts
    hot = payload["runs"]["math/hellora/0"]
    assert hot["adapted_selection_share"] >= run["adapted_selection_share"]  # the top-k take the most traffic
    assert hellora["params_pct_of_lora"] == pytest.approx(
        100.0 * hot["trainable_params"] / payload["runs"]["math/lora/0"]["trainable_params"]
    )
    for name, result in payload["runs"].items():  # each run's own CPU time, though two ran at once
        assert 0 < result["cpu_seconds"] <= 1.5 * result["wall_seconds"] + 5, name
    drift = payload["runs"]["math/lora/0"]["routing_drift"]
    assert drift["adapted_share_before"] == drift["adapted_share_after"] == 1.0  # every expert adapted
    drift = hot["routing_drift"]
    assert 0.0 <= drift["hot_overlap"] <= 1.0 and drift["layers"][0]["hot_before"] == hot["hot_experts"][0]
    assert drift["adapted_share_before"] == pytest.approx(hot["adapted_selection_share"], rel=1e-6)
    assert rows["math", "hellora"]["drift_hot_overlap"] == drift["hot_overlap"]
    markdown = (out / "miniature_study.md").read_text()
    assert "## Routing drift during fine-tuning" in markdown
    assert "| math | hellora | 1 |" in markdown and "- math: HELLoRA trains" in markdown
    assert "one seed: no verdict" in markdown and "- math: HELLoRA against random experts" in markdown


def test_bad_options_are_refused_before_any_training(tiny_model, tmp_path, capsys):
    out = tmp_path / "results"
    model = ["--model", str(tiny_model), "--out", str(out)]
    for argv, message in (
        ([*model, "--methods", "lora", "sparse_magic"], "--methods: unknown sparse_magic; choose from lora, hellora"),
        ([*model, "--tasks", "poetry"], "--tasks: unknown poetry; choose from math, code, safety"),
        (["--model", str(tmp_path / "nowhere"), "--out", str(out)], "lacks config.json, model.safetensors"),
        ([*model, "--seeds", "0", "0"], "--seeds must be distinct"),
        ([*model, "--steps", "0"], "--steps must be >= 1"),
        ([*model, "--jobs", "0"], "--jobs must be >= 1"),
        ([*model, "--tasks", "safety", "--safety-data", str(tmp_path)], "point --safety-data at that folder"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_study(*argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not out.exists()
    # Results made with other settings are never mixed with these.
    out.mkdir()
    out.joinpath("miniature_study.json").write_text(
        json.dumps({"settings": {"model": "other"}, "base": None, "runs": {}})
    )
    with pytest.raises(SystemExit, match="other settings .* give another --out"):
        run_study(*model, "--tasks", "math")
    assert not (out / "work").exists()


def test_task_hot_sets_are_compared_with_each_pretraining_domains_hot_set(tmp_path):
    report = tmp_path / "miniature_routing.json"
    hot = {"math": [[0, 1], [2, 3]], "code": [[4, 5], [6, 7]]}
    report.write_text(json.dumps({"model": str(tmp_path), "results": {"pretrained": {"hot": hot}}}))
    runs = {
        "math/hellora/0": {"task": "math", "method": "hellora", "seed": 0, "hot_experts": [[0, 1], [2, 6]]},
        "math/lora/0": {"task": "math", "method": "lora", "seed": 0, "hot_experts": [[0, 1, 2, 3, 4, 5, 6, 7]] * 2},
    }
    overlap = study.task_domain_overlap(runs, str(tmp_path), report)
    assert overlap == {"math": {"0": {"math": 0.75, "code": 0.25}}}  # layer 0: 2/2 and 0/2; layer 1: 1/2 and 1/2
    assert "math: HELLoRA's hot experts" in study.overlap_lines(overlap) and "math 0.75" in study.overlap_lines(overlap)
    assert study.task_domain_overlap(runs, str(tmp_path / "another-model"), report) is None  # another model's report
    assert study.task_domain_overlap(runs, str(tmp_path), tmp_path / "absent.json") is None
