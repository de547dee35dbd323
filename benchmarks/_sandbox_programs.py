"""What the sandbox benchmarks share: the reference programs, the layers a result says held, percentiles.

The programs are built exactly as the evaluation builds them (`humaneval_program`, `mbpp_program`),
with the data set's own solution as the completion, so their times are those of correct programs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy
from _common import machine_markdown

from hellora_pl.evaluation.code import MBPP_SPLITS, humaneval_program, load_humaneval, load_mbpp, mbpp_program

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Program:
    benchmark: str  # "humaneval" or "mbpp"
    task_id: str
    source: str


def humaneval_programs(data: Path, limit: int | None = None) -> list[Program]:
    """HumanEval's canonical solutions, each with its tests and the call to `check`."""
    problems = load_humaneval(str(data / DATA_FILES["humaneval"]))[:limit]
    return [Program("humaneval", p["task_id"], humaneval_program(p, p["canonical_solution"])) for p in problems]


def mbpp_programs(data: Path, limit: int | None = None) -> list[Program]:
    """MBPP's reference solutions of all four splits (974 tasks), in task-id order."""
    path = str(data / DATA_FILES["mbpp"])
    problems = sorted((p for split in MBPP_SPLITS for p in load_mbpp(path, split)), key=lambda p: int(p["task_id"]))
    return [Program("mbpp", f"mbpp/{p['task_id']}", mbpp_program(p, p["code"])) for p in problems[:limit]]


DATA_FILES = {"humaneval": Path("humaneval") / "HumanEval.jsonl.gz", "mbpp": Path("mbpp") / "mbpp.jsonl"}


def check_data(data: Path, benchmarks: Sequence[str] = ("humaneval", "mbpp")) -> Path:
    """The data folder, or an error saying which files are missing and how to point at them."""
    missing = [str(data / DATA_FILES[name]) for name in benchmarks if not (data / DATA_FILES[name]).is_file()]
    if missing:
        raise SystemExit(f"missing data files {missing}; pass --data <folder holding humaneval/ and mbpp/>")
    return data


def held_layers(result) -> tuple[str, ...]:
    """The sandbox layers that held a run, as the result records them (`layers`, or `isolation` before)."""
    for name in ("layers", "isolation"):
        value = getattr(result, name, None)
        if value is not None:
            return tuple(value)
    raise AttributeError(f"{type(result).__name__} records neither `layers` nor `isolation`")


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """{"p50": ..., "p90": ..., "p99": ...} in seconds, numpy's linear interpolation."""
    if not values:
        raise ValueError("percentiles of no values")
    return {f"p{q:g}": round(float(v), 3) for q, v in zip(qs, numpy.percentile(values, qs))}


def uptime() -> str:
    """`uptime`'s line (load averages and logged-in users), so a reader can judge how busy the machine was."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def machine_section(payload: dict) -> list[str]:
    """The markdown "Machine" section of a sandbox benchmark: load before and after, then the machine."""
    return [
        "",
        "## Machine",
        "",
        f"- uptime before: `{payload['uptime_before']}`",
        f"- uptime after: `{payload['uptime_after']}`",
        machine_markdown(payload["machine"]),
    ]
