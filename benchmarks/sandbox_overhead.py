"""Per-program cost of the sandbox on HumanEval's 164 canonical solutions, mode by mode, 1 and 2 workers.

Why: every generated sample of a code benchmark pays the sandbox's start-up; this says how much, next
to the same programs run with a plain `subprocess.run([sys.executable, file])` (no sandbox at all),
in one run so that the ratios share the machine's load. Modes are chosen by the sandbox's layer names
(`run_program(source, limits, layers=...)`): a mode needs its `required` layers to hold and its
`excluded` ones not to; where this code has no such layer, or it does not hold on this machine, the
mode is reported as "not available" and never run as another mode. Each run's layers are checked
again on every program.

    python benchmarks/sandbox_overhead.py                 # 164 programs, 1 and 2 workers, 1 repeat
    python benchmarks/sandbox_overhead.py --repeats 3
    python benchmarks/sandbox_overhead.py --smoke         # 4 programs (tests)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import RESULTS_DIR, load_average, machine_info, markdown_table, text_table, write_results
from _sandbox_programs import (
    DEFAULT_DATA,
    check_data,
    held_layers,
    humaneval_programs,
    machine_section,
    percentiles,
    uptime,
)

from hellora_pl.evaluation import sandbox

BWRAP = "bwrap"
BASELINE = "no sandbox (subprocess.run)"


@dataclass(frozen=True)
class Mode:
    """How to run: ``layers`` None is the no-sandbox baseline; "all" is every optional layer not excluded."""

    name: str
    layers: tuple[str, ...] | str | None
    required: tuple[str, ...] = ()  # must hold on every program, or the mode is not what it says
    excluded: tuple[str, ...] = ()  # must not be asked for nor hold

    def wanted(self, vocabulary: Sequence[str]) -> tuple[str, ...] | None:
        """The layer names to pass to `run_program` with this sandbox's vocabulary."""
        if self.layers is None:
            return None
        chosen = vocabulary if self.layers == "all" else self.layers
        return tuple(layer for layer in chosen if layer not in self.excluded)


MODES = (
    Mode(BASELINE, None),
    Mode("sandbox with bubblewrap", "all", required=(BWRAP,)),
    Mode("sandbox without bubblewrap (own layers)", "all", excluded=(BWRAP,)),
    Mode("sandbox, rlimits + session only", (), excluded=(BWRAP,)),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding humaneval/")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="passes per mode and worker count, interleaved")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-program limit (s), far above any of them")
    parser.add_argument("--limit", type=int, default=None, help="first N programs only")
    parser.add_argument("--smoke", action="store_true", help="4 programs, 1 repeat (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and markdown files")
    args = parser.parse_args(argv)
    if args.smoke:
        args.limit, args.repeats = 4, 1
    if min(args.workers) < 1 or args.repeats < 1:
        parser.error(f"need workers >= 1 and repeats >= 1; got {args.workers} and {args.repeats}")
    return args


def availability(mode: Mode, limits: sandbox.SandboxLimits) -> str:
    """"ok", or why the mode cannot run here: the code lacks a layer name, or the layer does not hold.

    The probe (an empty program) also warms the mode up, so that no mode pays for cold caches in its timing.
    """
    if mode.layers is None:
        return "ok" if run_plain("", limits.timeout_s) else "not available: an empty program did not exit with 0"
    vocabulary = tuple(sandbox.OPTIONAL_LAYERS)
    named = (*mode.required, *(mode.layers if mode.layers != "all" else ()))
    unknown = [layer for layer in named if layer not in vocabulary]
    if unknown:
        return f"not available: the sandbox has no layer named {unknown} (its layers: {list(vocabulary)})"
    probe = sandbox.run_program("", limits, layers=mode.wanted(vocabulary))
    if not probe.passed:
        return f"not available: an empty program did not pass ({probe.status}: {probe.reason})"
    return _layer_problem(mode, held_layers(probe)) or "ok"


def _layer_problem(mode: Mode, held: Sequence[str]) -> str | None:
    missing = [layer for layer in mode.required if layer not in held]
    if missing:
        return f"not available: layer(s) {missing} did not hold on this machine (held: {list(held)})"
    extra = [layer for layer in mode.excluded if layer in held]
    if extra:
        return f"not available: layer(s) {extra} held although not asked for (held: {list(held)})"
    return None


def runner_for(mode: Mode, limits: sandbox.SandboxLimits) -> Callable[[str], tuple[bool, tuple[str, ...]]]:
    """A function source -> (passed, layers held) for one mode."""
    if mode.layers is None:
        return lambda source: (run_plain(source, limits.timeout_s), ())
    wanted = mode.wanted(tuple(sandbox.OPTIONAL_LAYERS))

    def run(source: str) -> tuple[bool, tuple[str, ...]]:
        result = sandbox.run_program(source, limits, layers=wanted)
        return result.passed, held_layers(result)

    return run


def run_plain(source: str, timeout_s: float) -> bool:
    """The baseline: the program in a file of a fresh temporary directory, run by this interpreter."""
    with tempfile.TemporaryDirectory(prefix="hellora-plain-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(source, encoding="utf-8")
        try:
            done = subprocess.run([sys.executable, str(path)], cwd=tmp, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0


def time_pass(run: Callable, sources: Sequence[str], workers: int) -> tuple[float, list[float], list[tuple]]:
    """Total wall time of one pass, each program's wall time (around the whole call), and the outcomes."""

    def timed(source: str):
        start = time.perf_counter()
        outcome = run(source)
        return time.perf_counter() - start, outcome

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pairs = list(pool.map(timed, sources))
    return time.perf_counter() - start, [t for t, _ in pairs], [o for _, o in pairs]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    programs = humaneval_programs(check_data(args.data, ("humaneval",)), args.limit)
    sources = [p.source for p in programs]
    limits = sandbox.SandboxLimits(timeout_s=args.timeout)
    load_at_start, uptime_before = load_average(), uptime()
    status = {mode.name: availability(mode, limits) for mode in MODES}
    active = [mode for mode in MODES if status[mode.name] == "ok"]
    samples = {
        (mode.name, workers): {"totals": [], "per_program": [], "passed": [], "held": set()}
        for mode in active
        for workers in args.workers
    }
    for repeat in range(args.repeats):
        for workers in args.workers:
            shift = repeat % len(active)
            for mode in [*active[shift:], *active[:shift]]:  # rotate so no mode always runs first
                total, per_program, outcomes = time_pass(runner_for(mode, limits), sources, workers)
                cell = samples[(mode.name, workers)]
                cell["totals"].append(total)
                cell["per_program"] += per_program
                cell["passed"].append(sum(passed for passed, _ in outcomes))
                for _, held in outcomes:
                    cell["held"].add(held)
                    problem = _layer_problem(mode, held)
                    if problem:
                        status[mode.name] = "invalid: " + problem.removeprefix("not available: ")
    uptime_after = uptime()
    rows = summarize(samples, status, args.workers, len(sources))
    payload = {
        "benchmark": "sandbox_overhead",
        "programs": len(sources),
        "repeats": args.repeats,
        "limits": {"timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb},
        "sandbox_layer_names": list(sandbox.OPTIONAL_LAYERS),
        "modes": {mode.name: status[mode.name] for mode in MODES},
        "uptime_before": uptime_before,
        "uptime_after": uptime_after,
        "machine": machine_info(torch.device("cpu"), __file__, argv, load_at_start),
        "rows": rows,
    }
    print(text_table(HEADERS, table_rows(payload)))
    print(f"\nuptime before: {uptime_before}\nuptime after:  {uptime_after}")
    json_path, md_path = write_results(args.out, "sandbox_overhead", payload, render_markdown(payload))
    print(f"\nwrote {json_path} and {md_path}")
    return payload


def summarize(samples: dict, status: dict, workers_list: Sequence[int], programs: int) -> list[dict]:
    """One row per mode and worker count; ratios against the baseline at the same worker count."""
    rows = []
    for mode in MODES:
        for workers in workers_list:
            row = {"mode": mode.name, "workers": workers, "status": status[mode.name]}
            cell = samples.get((mode.name, workers))
            if cell is not None:
                per_program = cell["per_program"]
                row |= {
                    "passed": f"{min(cell['passed'])}/{programs}",
                    "total_s": round(statistics.median(cell["totals"]), 3),
                    "totals_s": [round(t, 3) for t in cell["totals"]],
                    "per_program_mean_ms": round(1e3 * statistics.fmean(per_program), 2),
                    **{f"per_program_{k}_ms": round(1e3 * v, 1) for k, v in percentiles(per_program).items()},
                    "layers_held": sorted(", ".join(held) for held in cell["held"]),
                }
            rows.append(row)
    for row in rows:
        base = next((r for r in rows if r["mode"] == BASELINE and r["workers"] == row["workers"]), None)
        if "total_s" in row and base is not None and "total_s" in base:
            row["total_over_baseline"] = round(row["total_s"] / base["total_s"], 2)
            row["extra_ms_per_program"] = round(row["per_program_mean_ms"] - base["per_program_mean_ms"], 1)
    return rows


HEADERS = ["mode", "workers", "passed", "total s", "ms/program (mean)", "p50 ms", "p90 ms", "x baseline",
           "+ms/program", "layers held"]  # fmt: skip


def table_rows(payload: dict) -> list[list]:
    out = []
    for r in payload["rows"]:
        if "total_s" not in r:
            out.append([r["mode"], r["workers"], r["status"], *[""] * (len(HEADERS) - 3)])
            continue
        flag = "" if r["status"] == "ok" else f" ({r['status']})"
        out.append(
            [r["mode"] + flag, r["workers"], r["passed"], f"{r['total_s']:.2f}", f"{r['per_program_mean_ms']:.1f}",
             f"{r['per_program_p50_ms']:.1f}", f"{r['per_program_p90_ms']:.1f}",
             f"{r.get('total_over_baseline', float('nan')):.2f}", f"{r.get('extra_ms_per_program', float('nan')):+.1f}",
             "; ".join(r["layers_held"]) or "-"]
        )  # fmt: skip
    return out


def render_markdown(payload: dict) -> str:
    lines = [
        f"# Sandbox overhead: HumanEval's {payload['programs']} canonical solutions",
        "",
        "Per-program time is the wall time around one call (temporary directory, writing the program, running "
        "it, reading its output), for the sandbox (`run_program`) and for the baseline, a plain "
        "`subprocess.run([sys.executable, file])` of the same program; `total s` is one pass over all programs "
        f"(median of {payload['repeats']} interleaved pass(es)); `x baseline` and `+ms/program` compare with the "
        "baseline at the same worker count.",
        "",
        markdown_table(HEADERS, table_rows(payload)),
        "",
        "Modes:",
        "",
        *[f"- {name}: {state}" for name, state in payload["modes"].items()],
        f"- the sandbox's layer names: {payload['sandbox_layer_names']}",
        *machine_section(payload),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
