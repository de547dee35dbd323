"""One command that measures on a CUDA machine everything issue 16 asks for, inside a time budget.

    python benchmarks/gpu_suite.py --out DIR                    # CUDA: every step, within 8 minutes on an H100/H200
    python benchmarks/gpu_suite.py --out DIR --dry-run          # any machine: check the arguments, print the plan
    TRITON_INTERPRET=1 python benchmarks/gpu_suite.py --out DIR --tiny   # CPU: the same steps at tiny shapes

Steps, in order (select some with --steps):
  kernel_tests      pytest on tests/test_triton_kernels.py and tests/test_triton_nf4.py (CUDA when present),
                    its junit XML read into passed / failed / skipped
  expert_path       benchmarks/expert_path.py at its olmoe and mixtral shapes: Triton HELLoRA against
                    transformers' frozen grouped_mm base and PEFT
  train_throughput  benchmarks/train_throughput.py at OLMoE-1B-7B sizes with fewer layers: HELLoRA, LoRA and
                    PEFT against the attention-only LoRA floor
  memory            hellora_pl.budget's --memory prediction against torch.cuda.max_memory_allocated of real
                    training steps, for HELLoRA and LoRA on an OLMoE-shaped model

Why child processes: each step runs in its own process, killed at its time budget, so a hung kernel
or a slow compile cannot hang the suite; a step that would start with the total budget spent is
skipped with that reason. A fresh process per step also gives the memory step an allocator that
holds nothing but its own model. Each child imports only what its step needs (the GPU machine has
no jsonargparse, datasets, torchdata or bitsandbytes; only the kernel tests' conftest needs the
first three: that step is skipped, naming them, when they are missing).

Writes DIR/gpu_suite.json and DIR/gpu_suite.md (device, torch, triton, transformers and peft
versions; per step: status, seconds, figures); each step's own files and log go in DIR/steps/<step>/.
Exit status: 0 when every step passed or measured, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
STEPS = ("kernel_tests", "expert_path", "train_throughput", "memory")
# Seconds per step on one H100/H200 (full) and on 2 CPU cores under the interpreter (tiny); the
# full budgets add up to the 8 minutes the issue allows, --budget caps the whole run.
STEP_BUDGETS = {
    "full": {"kernel_tests": 150, "expert_path": 120, "train_throughput": 150, "memory": 60},
    "tiny": {"kernel_tests": 60, "expert_path": 60, "train_throughput": 90, "memory": 60},
}
TOTAL_BUDGET = {"full": 480, "tiny": 240}
MIN_STEP_SECONDS = 5  # a step is not started with less than this left of the total budget
KERNEL_TEST_FILES = ("tests/test_triton_kernels.py", "tests/test_triton_nf4.py")
TINY_KERNEL_TESTS = "no_grad_forward or routing_puts_hot_blocks or compact_routing"  # 3 nodes, ~1 s interpreted
CONFTEST_MODULES = ("pytest", "triton", "torchdata", "datasets", "jsonargparse")  # tests/conftest.py's import chain
OUTPUTS = ("gpu_suite.json", "gpu_suite.md")
NO_CUDA = "no CUDA device: use --dry-run to see the plan, or --tiny under TRITON_INTERPRET=1"
OK_STATUSES = ("passed", "measured")
CHILD_STEP_NAMES = ("expert_path", "train_throughput", "memory")  # run by this script in a child process

# train_throughput at OLMoE-1B-7B sizes (hellora_pl.backbones.shapes), 4 of its 16 layers to fit the budget.
THROUGHPUT_LAYERS = 4
THROUGHPUT_TOKENS = 4096
THROUGHPUT_RANK = 32
TINY_THROUGHPUT = {"hidden": 64, "intermediate": 32, "experts": 8, "top_k": 2, "layers": 2, "tokens": 16, "rank": 4}
# The memory step: an OLMoE-1B-7B-shaped model with 4 layers, bf16 weights, fp32 adapters.
MEMORY_METHODS = ("hellora", "lora")
MEMORY_FULL = {"layers": 4, "batch": 4, "seq_len": 1024, "rank": 32}
MEMORY_TINY = {"layers": 2, "batch": 2, "seq_len": 32, "rank": 4}
TINY_MEMORY_CONFIG = {"hidden_size": 64, "intermediate_size": 48, "vocab_size": 256, "num_attention_heads": 4,
                      "num_key_value_heads": 4}  # fmt: skip


# -- the plan --------------------------------------------------------------------------------


@dataclass
class StepPlan:
    """One step: what it calls (for the dry run and the report) and its time budget in seconds."""

    name: str
    budget_s: float
    calls: list[str]


def mode_of(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else "full"


def timing_argv(args: argparse.Namespace) -> list[str]:
    """--warmup / --repeats for the benchmarks: as given, else 1 and 1 with --tiny, else the benchmark's own."""
    default = 1 if args.tiny else None
    warmup = default if args.warmup is None else args.warmup
    repeats = default if args.repeats is None else args.repeats
    argv = [] if warmup is None else ["--warmup", str(warmup)]
    return argv + ([] if repeats is None else ["--repeats", str(repeats)])


def kernel_test_command(args: argparse.Namespace, step_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "pytest", *KERNEL_TEST_FILES, "-q", "-p", "no:cacheprovider"]
    command += ["--junitxml", str(step_dir / "junit.xml")]
    return command + (["-k", TINY_KERNEL_TESTS] if args.tiny else [])


def expert_path_argvs(args: argparse.Namespace, step_dir: Path) -> list[list[str]]:
    shapes = ["tiny"] if args.tiny else ["olmoe", "mixtral"]
    return [["--shape", shape, *timing_argv(args), "--out", str(step_dir)] for shape in shapes]


def throughput_argv(args: argparse.Namespace, step_dir: Path) -> list[str]:
    if args.tiny:
        shape, sizes = "tiny", TINY_THROUGHPUT
    else:
        from hellora_pl.backbones.shapes import SHAPES  # light: no torch model is built

        config = SHAPES["olmoe-1b-7b"].config
        shape = "olmoe"
        sizes = {"hidden": config["hidden_size"], "intermediate": config["intermediate_size"],
                 "experts": config["num_experts"], "top_k": config["num_experts_per_tok"],
                 "layers": THROUGHPUT_LAYERS, "tokens": THROUGHPUT_TOKENS, "rank": THROUGHPUT_RANK}  # fmt: skip
    argv = ["--shape", shape]
    for key, value in sizes.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return argv + timing_argv(args) + ["--out", str(step_dir)]


def memory_sizes(args: argparse.Namespace) -> dict:
    return MEMORY_TINY if args.tiny else MEMORY_FULL


def plan_steps(args: argparse.Namespace) -> list[StepPlan]:
    budgets = args.budgets
    plans = []
    for name in args.steps:
        step_dir = args.out / "steps" / name
        if name == "kernel_tests":
            calls = [shlex.join(kernel_test_command(args, step_dir))]
            plans.append(StepPlan(name, budgets[name], calls))
        elif name == "expert_path":
            argvs = expert_path_argvs(args, step_dir)
            plans.append(StepPlan(name, budgets[name], [f"expert_path.main({argv})" for argv in argvs]))
        elif name == "train_throughput":
            argv = throughput_argv(args, step_dir)
            plans.append(StepPlan(name, budgets[name], [f"train_throughput.main({argv})"]))
        else:
            m = memory_sizes(args)
            shape = "tiny OLMoE" if args.tiny else "OLMoE-1B-7B"
            calls = [
                f"hellora_pl.budget.budget(meta {shape} model with {m['layers']} layers, method={method!r}, "
                f"rank={m['rank']}, profile=the batch's routing, memory=MemorySettings(batch_size={m['batch']}, "
                f"seq_len={m['seq_len']}, dtype='bfloat16')) vs the same plan trained for 2 steps: "
                + ("torch.cuda.max_memory_allocated and " if not args.tiny or args.cuda else "")
                + "bytes saved for backward"
                for method in MEMORY_METHODS
            ]
            plans.append(StepPlan(name, budgets[name], calls))
    return plans


# -- arguments -------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gpu_suite.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.json, gpu_suite.md, steps/")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), help=f"a subset of: {' '.join(STEPS)}")
    budget_help = f"total seconds (default {TOTAL_BUDGET['full']}, {TOTAL_BUDGET['tiny']} with --tiny)"
    parser.add_argument("--budget", type=float, default=None, help=budget_help)
    parser.add_argument("--step-budget", action="append", default=[], metavar="STEP=SECONDS",
                        help="change one step's budget (repeatable), e.g. kernel_tests=300")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, run nothing")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, 3 kernel tests, 1 warmup and 1 repeat")
    parser.add_argument("--force", action="store_true", help="overwrite gpu_suite.json / .md already in --out")
    parser.add_argument("--warmup", type=int, default=None, help="the benchmarks' warmup (default: theirs)")
    parser.add_argument("--repeats", type=int, default=None, help="the benchmarks' timed repeats (default: theirs)")
    parser.add_argument("--child", choices=CHILD_STEP_NAMES, default=None, help=argparse.SUPPRESS)  # run one step
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every refusal names the problem and its fix, before anything is written or imported."""
    args.out = args.out.expanduser().absolute()  # the children run in the checkout
    unknown = [step for step in args.steps if step not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown step {unknown[0]!r}; choose from {', '.join(STEPS)}.")
    args.steps = [step for step in STEPS if step in args.steps]  # run order, once each
    args.budgets = dict(STEP_BUDGETS[mode_of(args)])
    for item in args.step_budget:
        name, _, seconds = item.partition("=")
        if name not in STEPS:
            parser.error(f"--step-budget {item!r}: unknown step {name!r}; choose from {', '.join(STEPS)}.")
        try:
            args.budgets[name] = float(seconds)
        except ValueError:
            parser.error(f"--step-budget {item!r}: give STEP=SECONDS, e.g. kernel_tests=300.")
        if args.budgets[name] <= 0:
            parser.error(f"--step-budget {item!r}: a step's budget must be more than 0 seconds.")
    if args.budget is None:
        args.budget = float(TOTAL_BUDGET[mode_of(args)])
    if args.budget <= 0:
        parser.error(f"--budget must be more than 0 seconds, got {args.budget:g}.")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}.")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}.")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a folder (created when missing).")
    existing = [name for name in OUTPUTS if (args.out / name).exists()]
    if existing and not args.force:
        parser.error(f"--out {args.out} already holds {existing[0]}; pass --force to overwrite it, or another --out.")


# -- environment -----------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(cuda: bool) -> dict:
    """Device and versions (package metadata: nothing imported but torch)."""
    import torch
    from _common import cpu_model

    env = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU: {cpu_model()}",
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    for name in ("triton", "transformers", "peft", "lightning", "pytest", "bitsandbytes"):
        env[name] = package_version(name)
    return env


def child_env(args: argparse.Namespace) -> dict:
    """The children see the checkout on PYTHONPATH (no install needed), unbuffered output, the hub offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    if args.tiny and not args.cuda:
        env.setdefault("TRITON_INTERPRET", "1")
    return env


# -- running a step ----------------------------------------------------------------------------


@dataclass
class StepResult:
    name: str
    status: str  # passed, measured, failed, skipped, timed_out or error
    seconds: float
    budget_s: float
    reason: str = ""
    figures: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def run_bounded(command: list[str], timeout: float, log: Path, env: dict) -> tuple[int | None, float]:
    """Run `command` in its own process group, output to `log`; kill the group at `timeout` (rc None)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            rc = process.wait(timeout=timeout)
        except BaseException as error:  # its budget spent, or Ctrl-C: the step's whole group goes, not the suite's
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if not isinstance(error, subprocess.TimeoutExpired):
                raise
            rc = None
    return rc, time.perf_counter() - start


def log_tail(log: Path, lines: int = 8) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " / ".join(line.strip() for line in text[-lines:])


def run_step(plan: StepPlan, args: argparse.Namespace, timeout: float, env: dict) -> StepResult:
    step_dir = args.out / "steps" / plan.name
    step_dir.mkdir(parents=True, exist_ok=True)
    log = step_dir / "log.txt"
    if plan.name == "kernel_tests":
        missing = [name for name in CONFTEST_MODULES if importlib.util.find_spec(name) is None]
        if missing:
            reason = (f"not run: {', '.join(missing)} not installed (tests/conftest.py imports them); carry their "
                      "wheels, see README")  # fmt: skip
            return StepResult(plan.name, "skipped", 0.0, plan.budget_s, reason)
        (step_dir / "junit.xml").unlink(missing_ok=True)
        rc, seconds = run_bounded(kernel_test_command(args, step_dir), timeout, log, env)
        result = kernel_test_result(step_dir / "junit.xml", rc, log)
    else:
        (step_dir / "result.json").unlink(missing_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--child", plan.name, "--out", str(args.out)]
        command += (["--tiny"] if args.tiny else []) + timing_argv(args)  # the child resolves them the same way
        rc, seconds = run_bounded(command, timeout, log, env)
        result = child_result(step_dir / "result.json", rc, log)
    if rc is None:
        result.status, result.reason = "timed_out", f"killed at its budget of {timeout:.0f} s; log: {log_tail(log, 3)}"
    result.name, result.seconds, result.budget_s = plan.name, round(seconds, 1), plan.budget_s
    result.files = sorted(str(p.relative_to(args.out)) for p in step_dir.rglob("*") if p.is_file())
    return result


def kernel_test_result(junit: Path, rc: int | None, log: Path) -> StepResult:
    """passed / failed / skipped counts from pytest's junit XML; passed only with no failure and rc 0."""
    if not junit.exists():
        return StepResult("", "error", 0, 0, f"pytest wrote no junit XML (rc {rc}): {log_tail(log)}")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skips = [], set()
    for suite in ET.parse(junit).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        skipped = case.find("skipped")
        if skipped is not None:
            skips.add(skipped.get("message", ""))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    figures = {"passed": passed, "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
               "failed_tests": failed[:20], "skip_reasons": sorted(skips)[:10]}  # fmt: skip
    ok = rc == 0 and passed > 0 and not counts["failures"] and not counts["errors"]
    reason = "" if ok else f"pytest rc {rc}: {len(failed)} failed or errored, {passed} passed"
    return StepResult("", "passed" if ok else "failed", 0, 0, reason, figures)


def child_result(path: Path, rc: int | None, log: Path) -> StepResult:
    if not path.exists():
        return StepResult("", "error", 0, 0, f"the step's process ended (rc {rc}) without a result: {log_tail(log)}")
    data = json.loads(path.read_text())
    return StepResult("", data["status"], 0, 0, data.get("reason", ""), data.get("figures", {}))


# -- the steps, each in its own process ----------------------------------------------------------


def run_child(args: argparse.Namespace) -> int:
    """Run one step here and write steps/<step>/result.json: {status, reason, figures}."""
    step_dir = args.out / "steps" / args.child
    try:
        status, reason, figures = CHILD_STEPS[args.child](args, step_dir)
    except Exception as error:  # recorded, with the traceback in the log
        traceback.print_exc()
        status, reason, figures = "error", f"{type(error).__name__}: {one_line(error)}", {}
    (step_dir / "result.json").write_text(json.dumps({"status": status, "reason": reason, "figures": figures},
                                                     indent=2) + "\n")  # fmt: skip
    return 0 if status in OK_STATUSES else 1


def one_line(error: BaseException, limit: int = 400) -> str:
    return " ".join(str(error).split())[:limit]


def required(row: dict, keys: tuple[str, ...], where: str) -> dict:
    """The named fields of a benchmark's row, or a clear error naming the missing one."""
    missing = [key for key in keys if key not in row]
    if missing:
        raise KeyError(f"{where}: row {row.get('method') or row.get('variant')!r} has no {missing[0]!r} "
                       f"(fields: {', '.join(sorted(row))}); is the benchmark older than this suite?")  # fmt: skip
    return {key: row[key] for key in keys}


def expert_path_step(args: argparse.Namespace, step_dir: Path) -> tuple[str, str, dict]:
    import expert_path
    import torch

    cuda = torch.cuda.is_available()
    figures, problems = {}, []
    for argv in expert_path_argvs(args, step_dir):
        try:
            payload = expert_path.main(argv)
        except Exception as error:  # the other shape still runs; the traceback is in the log
            traceback.print_exc()
            problems.append(f"{argv[1]}: {type(error).__name__}: {one_line(error)}")
            continue
        shape = payload["shape_name"]
        variants = {}
        for row in payload["rows"]:
            if row["status"] != "ok":
                variants[row["variant"]] = {"status": row["status"]}
                continue
            keys = ("ms_median", "ms_min", "ratio_to_base", "saved_bytes", "peak_bytes")
            variants[row["variant"]] = required(row, keys, f"expert_path {shape}")
        triton = variants.get("ours HELLoRA, hot only (Triton)", {})
        peft_row = variants.get("PEFT LoRA, all experts", {})
        summary = {"dtype": payload["dtype"], "tokens": payload["shape"]["tokens"],
                   "all_checks_passed": payload["all_checks_passed"], "variants": variants}  # fmt: skip
        if "ms_median" in triton and "ms_median" in peft_row:
            summary["triton_hellora_over_base"] = triton["ratio_to_base"]
            summary["peft_over_triton_hellora"] = round(peft_row["ms_median"] / triton["ms_median"], 3)
        figures[shape] = summary
        if not payload["all_checks_passed"]:
            failed = [c["name"] for c in payload["checks"] if not c["passed"]]
            problems.append(f"{shape}: checks failed: {'; '.join(failed)}")
        if cuda and "ms_median" not in triton:
            problems.append(f"{shape}: no Triton HELLoRA row on CUDA ({triton.get('status', 'missing')})")
    return ("failed", "; ".join(problems), figures) if problems else ("measured", "", figures)


def throughput_step(args: argparse.Namespace, step_dir: Path) -> tuple[str, str, dict]:
    import train_throughput

    argv = throughput_argv(args, step_dir)
    try:
        payload = train_throughput.main(argv)
    except SystemExit as exit_:  # argparse refused an option: a train_throughput.py older than issue 16
        raise RuntimeError(f"train_throughput.py refused {argv} (exit {exit_.code}); it needs the shape options "
                           "--hidden --intermediate --experts --top-k --layers --tokens --rank and the "
                           "attention_only floor (issue 16)") from None  # fmt: skip
    methods = {}
    for row in payload["rows"]:
        keys = ("ms_median", "ms_min", "tokens_per_s", "ratio_to_floor", "trainable_params")
        methods[required(row, ("method",), "train_throughput")["method"]] = required(row, keys, "train_throughput")
        if "max_allocated_bytes" in row:
            methods[row["method"]]["max_allocated_bytes"] = row["max_allocated_bytes"]
    missing = [m for m in ("attention_only", "lora", "hellora", "peft") if m not in methods]
    if missing:
        raise KeyError(f"train_throughput returned no row for {missing} (rows: {sorted(methods)})")
    config = payload["setup"]["config"]
    figures = {"layers": config["num_hidden_layers"], "hidden": config["hidden_size"], "experts": config["num_experts"],
               "tokens_per_step": payload["tokens_per_step"], "rank": payload["setup"]["rank"],
               "dtype": payload["setup"]["dtype"], "all_checks_passed": payload["all_checks_passed"],
               "methods": methods}  # fmt: skip
    if not payload["all_checks_passed"]:
        failed = [c["name"] for c in payload["checks"] if not c["passed"]]
        return "failed", f"checks failed: {'; '.join(failed)}", figures
    return "measured", "", figures


def memory_step(args: argparse.Namespace, step_dir: Path) -> tuple[str, str, dict]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures, problems = {"device": device.type, "configs": []}, []
    for method in MEMORY_METHODS:
        try:
            row = measure_memory_config(method, memory_sizes(args), args.tiny, device)
        except Exception as error:  # the other config still runs; the traceback is in the log
            traceback.print_exc()
            problems.append(f"{method}: {type(error).__name__}: {one_line(error)}")
            continue
        figures["configs"].append(row)
        if row["trainable_predicted"] != row["trainable_counted"]:
            problems.append(f"{method}: the budget's plan trains {row['trainable_predicted']:,} parameters, the "
                            f"model {row['trainable_counted']:,}: the figures compare different plans")  # fmt: skip
    if device.type != "cuda":
        figures["peak_not_measured"] = "no CUDA allocator statistics on CPU: peak not measured, only saved bytes"
    return ("failed", "; ".join(problems), figures) if problems else ("measured", "", figures)


def memory_model_config(sizes: dict, tiny: bool) -> dict:
    if tiny:
        from hellora_pl.backbones.tiny import TINY_CONFIGS

        config = {**TINY_CONFIGS["olmoe"][1], **TINY_MEMORY_CONFIG}
    else:
        from hellora_pl.backbones.shapes import SHAPES

        config = dict(SHAPES["olmoe-1b-7b"].config)
    return {**config, "num_hidden_layers": sizes["layers"]}


def measure_memory_config(method: str, sizes: dict, tiny: bool, device) -> dict:
    """The budget's predicted step memory for `method` against what the same plan's training steps hold.

    Predicted: `hellora_pl.budget.budget` on a meta model of the config with the batch's own routing
    profile (as `--memory --profile`). Measured on a fresh model: weights and adapters allocated, the
    bytes autograd saves for backward (parameters and buffers left out), and on CUDA the peak
    allocated over a second full step (AdamW state alive, grads freed before the forward).
    """
    import torch
    from _common import SavedTensorBytes, synchronize
    from transformers import AutoConfig

    from hellora_pl.adapters import inject_adapters
    from hellora_pl.backbones import BackboneConfig
    from hellora_pl.backbones.shapes import meta_model
    from hellora_pl.budget import budget
    from hellora_pl.budget.settings import BudgetArguments, check_arguments, plan_settings
    from hellora_pl.kernels.triton_host import triton_available
    from hellora_pl.loading import load_backbone
    from hellora_pl.memory import MemorySettings
    from hellora_pl.routing import RoutingRecorder

    config = memory_model_config(sizes, tiny)
    cuda = device.type == "cuda"
    gc.collect()  # the previous config's model, optimizer and graph
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else 0
    with torch.device(device):
        model = load_backbone(BackboneConfig(model_type="olmoe", config=config, dtype="bfloat16", seed=0))
    held_before = {id(t) for t in [*model.parameters(), *model.buffers()]}
    weights = torch.cuda.memory_allocated(device) - before if cuda else tensor_bytes(model.parameters())
    ids = torch.randint(3, config["vocab_size"], (sizes["batch"], sizes["seq_len"]),
                        generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.armed = True
        model(input_ids=ids)
        profile = recorder.profile()  # the batch's own routing: the hot-row count is exact
    arguments = BudgetArguments(method=method, rank=sizes["rank"])
    hot_k, rank_max = check_arguments(arguments, config["num_experts"], config["num_experts_per_tok"])
    settings = plan_settings(arguments, hot_k, rank_max)
    memory = MemorySettings(batch_size=sizes["batch"], seq_len=sizes["seq_len"], dtype="bfloat16")
    report = budget(meta_model(AutoConfig.for_model("olmoe", **config)), method=method, rank=sizes["rank"],
                    profile=profile, memory=memory)  # fmt: skip
    predicted = {key: figure["value"] for key, figure in report["memory"]["figures"].items()}
    inject_adapters(model, settings.build(model, profile))
    added = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in held_before]
    adapters = torch.cuda.memory_allocated(device) - before - weights if cuda else tensor_bytes(added)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()

    meter = SavedTensorBytes([*model.parameters(), *model.buffers()])
    with meter.hooks():
        step()
    peak = None
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    return {
        "method": method,
        "layers": config["num_hidden_layers"],
        "tokens": sizes["batch"] * sizes["seq_len"],
        "rank": sizes["rank"],
        "expert_kernel": "auto: " + ("triton" if cuda and triton_available() else "torch"),
        "trainable_predicted": report["figures"]["trainable_params"]["value"],
        "trainable_counted": sum(p.numel() for p in trainable),
        "predicted_total_bytes": predicted["total"],
        "measured_peak_bytes": peak,
        "peak_ratio": None if peak is None else round(peak / predicted["total"], 4),
        "predicted_activation_bytes": predicted["activations"],
        "measured_saved_bytes": meter.nbytes,
        "activation_ratio": round(meter.nbytes / predicted["activations"], 4),
        "predicted_weight_bytes": predicted["weights"],
        "measured_weight_bytes": weights,
        "predicted_adapter_bytes": predicted["adapters"],
        "measured_adapter_bytes": adapters,
    }


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


CHILD_STEPS = {"expert_path": expert_path_step, "train_throughput": throughput_step, "memory": memory_step}


# -- the report --------------------------------------------------------------------------------


def mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f}"


def step_summary(result: StepResult) -> str:
    """One line of the main table's figures for each step."""
    f = result.figures
    if not f:
        return ""
    if result.name == "kernel_tests":
        return f"{f['passed']} passed, {f['failed']} failed, {f['errors']} errors, {f['skipped']} skipped"
    if result.name == "expert_path":
        parts = []
        for shape, s in f.items():
            part = f"{shape}: checks {'pass' if s['all_checks_passed'] else 'FAIL'}"
            if "triton_hellora_over_base" in s:
                part += (f", Triton HELLoRA {s['triton_hellora_over_base']:.2f}x base, "
                         f"PEFT {s['peft_over_triton_hellora']:.2f}x it")  # fmt: skip
            parts.append(part)
        return "; ".join(parts)
    if result.name == "train_throughput":
        m = f["methods"]
        return (f"x attention-only floor ({m['attention_only']['ms_median']:.1f} ms/step): HELLoRA "
                f"{m['hellora']['ratio_to_floor']:.2f}, LoRA {m['lora']['ratio_to_floor']:.2f}, "
                f"PEFT {m['peft']['ratio_to_floor']:.2f}")  # fmt: skip
    parts = []
    for c in f["configs"]:
        peak = "peak n/a" if c["peak_ratio"] is None else f"peak measured/predicted {c['peak_ratio']:.3f}"
        parts.append(f"{c['method']}: {peak}, saved/predicted activations {c['activation_ratio']:.3f}")
    return "; ".join(parts)


def render_markdown(report: dict, results: list[StepResult]) -> str:
    env = report["environment"]
    lines = [
        f"# GPU suite ({report['mode']}): {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, lightning {env['lightning']}, Python {env['python']}; TRITON_INTERPRET "
        f"{env['TRITON_INTERPRET']}. {report['date']}; total {report['seconds']:.0f} s of a {report['budget_s']:.0f} s "
        f"budget. Command: `{report['command']}`. Each step's files: `steps/<step>/` beside this file.",
        "",
        "| step | status | seconds | budget s | figures | reason |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        cells = [r.name, r.status, f"{r.seconds:.1f}", f"{r.budget_s:.0f}", step_summary(r), r.reason]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    for r in results:
        if r.name == "expert_path" and r.figures:
            lines += ["", "## expert_path: one MoE layer, forward + backward", ""]
            for shape, s in r.figures.items():
                lines += [f"{shape}, {s['dtype']}, tokens {s['tokens']}:", "",
                          "| variant | ms (median) | x base | peak MiB |", "| --- | --- | --- | --- |"]  # fmt: skip
                for name, v in s["variants"].items():
                    if "ms_median" not in v:
                        lines.append(f"| {name} | {v['status']} | | |")
                        continue
                    lines.append(
                        f"| {name} | {v['ms_median']:.3f} | {v['ratio_to_base']:.2f} | {mib(v['peak_bytes'])} |"
                    )
                lines.append("")
        if r.name == "train_throughput" and r.figures:
            f = r.figures
            lines += ["", f"## train_throughput: {f['layers']} layers, H {f['hidden']}, E {f['experts']}, "
                      f"{f['tokens_per_step']} tokens/step, rank {f['rank']}, {f['dtype']}", "",
                      "| method | ms/step (median) | tokens/s | x attention-only | max allocated MiB |",
                      "| --- | --- | --- | --- | --- |"]  # fmt: skip
            for name, m in f["methods"].items():
                lines.append(f"| {name} | {m['ms_median']:.1f} | {m['tokens_per_s']:.0f} | {m['ratio_to_floor']:.2f} | "
                             f"{mib(m.get('max_allocated_bytes'))} |")  # fmt: skip
        if r.name == "memory" and r.figures:
            lines += ["", "## memory: budget --memory prediction against training steps", "",
                      "| method | layers | tokens | predicted peak MiB | measured peak MiB | measured / predicted | "
                      "predicted activations MiB | saved for backward MiB | ratio | weights MiB (pred / meas) |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
            for c in r.figures["configs"]:
                ratio = "n/a" if c["peak_ratio"] is None else f"{c['peak_ratio']:.3f}"
                lines.append(f"| {c['method']} | {c['layers']} | {c['tokens']} | {mib(c['predicted_total_bytes'])} | "
                             f"{mib(c['measured_peak_bytes'])} | {ratio} | {mib(c['predicted_activation_bytes'])} | "
                             f"{mib(c['measured_saved_bytes'])} | {c['activation_ratio']:.3f} | "
                             f"{mib(c['predicted_weight_bytes'])} / {mib(c['measured_weight_bytes'])} |")  # fmt: skip
            if "peak_not_measured" in r.figures:
                lines += ["", r.figures["peak_not_measured"] + "."]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------


def print_plan(args: argparse.Namespace, plans: list[StepPlan]) -> None:
    print(f"gpu_suite plan ({mode_of(args)}; dry run, nothing is run): total budget {args.budget:g} s, "
          f"writes {args.out / OUTPUTS[0]} and {OUTPUTS[1]}, step files in {args.out / 'steps'}/")  # fmt: skip
    for index, plan in enumerate(plans, 1):
        print(f"{index}. {plan.name} (budget {plan.budget_s:g} s, in its own process)")
        for call in plan.calls:
            print(f"     {call}")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    sys.path[:0] = [path for path in (str(BENCHMARKS), str(REPO)) if path not in sys.path]  # no install needed
    if args.child is not None:
        import torch

        args.cuda = torch.cuda.is_available()
        return run_child(args)
    check_args(parser, args)
    args.cuda = False
    if args.dry_run:
        print_plan(args, plan_steps(args))
        return 0
    import torch

    args.cuda = torch.cuda.is_available()
    if not args.cuda and not args.tiny:
        parser.error(NO_CUDA)
    plans = plan_steps(args)
    args.out.mkdir(parents=True, exist_ok=True)
    env = child_env(args)
    start = time.perf_counter()
    results = []
    for plan in plans:
        left = args.budget - (time.perf_counter() - start)
        if left < MIN_STEP_SECONDS:
            reason = f"total budget spent ({args.budget - left:.0f} s of {args.budget:g} s used)"
            results.append(StepResult(plan.name, "skipped", 0.0, plan.budget_s, reason))
            continue
        print(f"[gpu_suite] {plan.name}: up to {min(plan.budget_s, left):.0f} s", flush=True)
        results.append(run_step(plan, args, min(plan.budget_s, left), env))
        print(f"[gpu_suite] {plan.name}: {results[-1].status} in {results[-1].seconds:.1f} s {results[-1].reason}",
              flush=True)  # fmt: skip
    report = {
        "suite": "gpu_suite",
        "mode": mode_of(args),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "benchmarks/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]),
        "budget_s": args.budget,
        "seconds": round(time.perf_counter() - start, 1),
        "environment": environment(args.cuda),
        "all_ok": all(r.status in OK_STATUSES for r in results),
        "steps": [asdict(r) for r in results],
    }
    (args.out / OUTPUTS[0]).write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report, results)
    (args.out / OUTPUTS[1]).write_text(markdown)
    print(markdown)
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
