"""Compile gate: every Triton kernel of the expert path, at the launches the launcher really makes, compiled ahead of
time for real GPU targets on a machine without a GPU (issue 16).

Why: the CPU interpreter checks arithmetic, not what the GPU compiler does. This compiles each kernel exactly as a
launch on a GPU would (same specialization, constexprs and autotune configs) for sm_90, sm_80 and sm_89, and reads
registers and spills from ptxas and shared memory from the compiled kernel.

1. Capture: `triton_host.triton_adapted_experts_forward` runs forward + backward (train) and a no-grad forward
   (eval) on a model shape's own experts module (frozen weights on the meta device, CPU activations) while
   `Autotuner.run` / `JITFunction.run` only record (kernel, args, kwargs, grid); all patches are undone after.
   TRITON_INTERPRET is removed first: the CUDA configs and block sizes are chosen when triton_jit is imported.
2. Expand: per target, `triton_jit.fitting_configs` (the autotuners' own pruning) keeps the configs that fit the
   target's shared memory per block; the dropped ones become rows "pruned for sm_XX".
3. Compile: Triton's own binder and `JITFunction._pack_args` specialize each (launch, config, target), deduplicated;
   `triton.compile` runs in a fork pool, with a fresh cache (ptxas logs only on a cache miss) and fp fusion on.
4. Check, print a markdown table and a summary; `--out DIR` writes compile_gate.json and compile_gate.md.

Fails (exit 1) on: a compile error; a launch for which no config fits a target; a kept config whose compiled shared
memory exceeds the target's limit (the estimate was wrong); a grid out of range; spills in any bf16/fp16 variant used
in training (fp32 spills are reported, and fail only with `--fail-on-spill fp32`); autotune-key collisions (two
launches reading one tuned entry while their constexprs differ: one winner would serve both).
The Triton internals used here (Autotuner.run's key, create_function_from_signature, JITFunction._pack_args,
backend.parse_options, the ptxas log printed under knobs.nvidia.dump_ptxas_log) were read in triton 3.6.0 and 3.9.0.

    python benchmarks/compile_gate.py --quick --jobs 2   # CI: OLMoE, bf16, train, 4096 tokens, sm_90 and sm_80
    python benchmarks/compile_gate.py --jobs 2           # full: 3 shapes, bf16/fp16/fp32, train+eval, 3 targets
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMEM_LIMIT = {90: 232_448, 80: 166_912, 86: 101_376, 89: 101_376}  # bytes per block (DESIGN.md)
GRID_MAX = (2**31 - 1, 65_535, 65_535)
GATE_SHAPES = ("olmoe-1b-7b", "mixtral-8x7b", "qwen3.6-35b-a3b")
DTYPE_NAMES = ("bf16", "fp16", "fp32")
MODES = ("train", "eval")
ALWAYS_FAIL_ON_SPILL = ("bf16", "fp16")
BREAK_RANK_BLOCK_ENV = "HELLORA_GATE_BREAK_RANK_BLOCK"  # test hook: rank_block returns this (a broken tile)
FULL = {"shape": ",".join(GATE_SHAPES), "dtypes": "bf16,fp16,fp32", "modes": "train,eval", "cc": "90,80,89",
        "tokens": "auto", "key_check_tokens": "128", "out": str(RESULTS_DIR)}  # fmt: skip
# --tokens auto: per shape, token counts whose average rows per expert (tokens x top-k / experts) make the launcher
# pick each BLOCK_M (triton_host._block_m: 64 above 32 rows per expert, 32 above 16, 16 otherwise)
AUTO_ROWS_PER_EXPERT = (512, 24, 8)
QUICK = {"shape": "olmoe-1b-7b", "dtypes": "bf16", "modes": "train", "cc": "90,80", "tokens": "4096",
         "key_check_tokens": "128", "out": None}  # fmt: skip
_SHORT = {"HAS_LORA": "L", "STORE_GU": "GU", "STORE_H": "SH", "HAS_ROW_SCALE": "RS", "GATHER": "G", "BLOCK_M": "M",
          "BLOCK_R": "R", "BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_D": "D", "PREC": "p", "LORA_PREC": "lp"}  # fmt: skip


# -- options -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI mode: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    ap.add_argument(
        "--shape", help=f"model shapes, comma-separated (hellora_pl.backbones.shapes); full: {FULL['shape']}"
    )
    ap.add_argument("--dtypes", help="activation dtypes (bf16, fp16, fp32); adapters are fp32")
    ap.add_argument("--modes", help="train (forward + backward) and/or eval (no-grad forward)")
    ap.add_argument("--cc", help="targets as compute capabilities: 90, 80, 89 (86 = 89's limit)")
    ap.add_argument(
        "--tokens",
        help="token counts whose launches are compiled; full: auto = per shape, the counts "
        "that make the launcher pick BLOCK_M 64, 32 and 16 (OLMoE: 4096,192,64)",
    )
    ap.add_argument("--key-check-tokens", help="extra token counts captured for the autotune-key check only")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--hot", type=int, default=8, help="hot experts (at most the layer's experts; default 8)")
    ap.add_argument("--kernel", default="", help="compile only these kernels, comma-separated (e.g. _shrink_kernel)")
    ap.add_argument("--max-variants", type=int, default=None, help="compile at most this many variants (smoke runs)")
    ap.add_argument("--fail-on-spill", default="", help="dtypes whose training variants must not spill besides "
                    f"{','.join(ALWAYS_FAIL_ON_SPILL)} (e.g. fp32)")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (fork pool)")
    ap.add_argument("--out", help="directory for compile_gate.json/.md (full default: benchmarks/results; quick: none)")
    args = ap.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(ap, args)
    return args


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(ap: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in _csv(text)]
    except ValueError:
        ap.error(f"{option} {text!r}: expected comma-separated whole numbers, e.g. {option} 4096,256")
    if any(v < 1 for v in values):
        ap.error(f"{option} {text!r}: every value must be at least 1")
    return values


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad input before any capture or compile (argparse exits with status 2 and the message)."""
    from hellora_pl.backbones.shapes import SHAPES

    args.shapes = _csv(args.shape)
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or not args.shapes:
        ap.error(f"--shape: unknown model shape(s) {unknown}; choose from {', '.join(sorted(SHAPES))}")
    args.dtype_list = _csv(args.dtypes)
    bad = [d for d in args.dtype_list if d not in DTYPE_NAMES]
    if bad or not args.dtype_list:
        ap.error(f"--dtypes: unknown dtype(s) {bad}; choose from {', '.join(DTYPE_NAMES)}")
    args.mode_list = _csv(args.modes)
    bad = [m for m in args.mode_list if m not in MODES]
    if bad or not args.mode_list:
        ap.error(f"--modes: unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    args.ccs = _ints(ap, "--cc", args.cc)
    bad = [c for c in args.ccs if c not in SMEM_LIMIT]
    if bad or not args.ccs:
        ap.error(f"--cc: unknown target(s) {bad}; known: {', '.join(map(str, SMEM_LIMIT))} (compute capability x 10)")
    args.token_list = None if args.tokens == "auto" else _ints(ap, "--tokens", args.tokens)
    if args.token_list == []:
        ap.error("--tokens: give at least one token count, e.g. --tokens 4096")
    args.key_tokens = _ints(ap, "--key-check-tokens", args.key_check_tokens)
    bad = [d for d in _csv(args.fail_on_spill) if d not in DTYPE_NAMES]
    if bad:
        ap.error(f"--fail-on-spill: unknown dtype(s) {bad}; choose from {', '.join(DTYPE_NAMES)}")
    args.spill_fails = sorted(set(ALWAYS_FAIL_ON_SPILL) | set(_csv(args.fail_on_spill)))
    for option, value in (("--jobs", args.jobs), ("--rank", args.rank), ("--hot", args.hot)):
        if value < 1:
            ap.error(f"{option} {value}: must be at least 1")
    if args.max_variants is not None and args.max_variants < 1:
        ap.error(f"--max-variants {args.max_variants}: must be at least 1 (leave it out to compile every variant)")
    if args.out is not None and not Path(args.out).is_dir():
        ap.error(f"--out {args.out}: not an existing directory; create it first or pass another")
    args.kernels = _csv(args.kernel)
    raw = os.environ.get(BREAK_RANK_BLOCK_ENV)
    if raw is not None and not raw.isdigit():
        ap.error(f"{BREAK_RANK_BLOCK_ENV}={raw!r}: expected a whole number (a rank tile), or unset it")
    args.break_rank_block = int(raw) if raw else None


def prepare_environment() -> str:
    """Before triton_jit is imported: no interpreter, a fresh cache (ptxas logs only on a miss). Fp fusion comes
    with each launch's own options (triton_jit.FP_FUSION), as on a GPU."""
    os.environ.pop("TRITON_INTERPRET", None)
    cache = tempfile.mkdtemp(prefix="hellora_compile_gate_")
    os.environ["TRITON_CACHE_DIR"] = cache
    return cache


# -- 1. capture ----------------------------------------------------------------------------


@dataclass
class Launch:
    """One recorded kernel launch, reduced to what the gate needs once its tensors are gone."""

    kernel: str
    shape: str
    use: str  # "bf16/train"
    tokens: int
    key: tuple | None  # the autotuner's cache entry (None: no tuning, a single config)
    constexprs: dict  # the launch's own constexprs (configs' not included)
    variants: list = field(default_factory=list)  # (cc, Spec) of each kept config
    pruned: list = field(default_factory=list)  # (cc, config) dropped by fitting_configs
    unfit: list = field(default_factory=list)  # targets for which no config is kept

    @property
    def where(self) -> str:
        return f"{self.shape} {self.use} T{self.tokens}"


def autotune_key(tuner, args: Sequence, kwargs: dict) -> tuple | None:
    """The entry of `tuner.cache` a launch reads, computed as `Autotuner.run` does in triton 3.6.0 and 3.9.0: the
    values of `tuner.keys` among the named arguments, then str(dtype) of every named argument with a dtype; None
    when the tuner has one config (it then looks nothing up)."""
    if tuner is None or len(tuner.configs) <= 1:
        return None
    named = {**dict(zip(tuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in tuner.arg_names}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def launch_constexprs(fn, args: Sequence, kwargs: dict) -> dict:
    """The constexpr parameters a launch passes itself (positionally or by name)."""
    named = {**{p.name: v for p, v in zip(fn.params, args)}, **kwargs}
    return {p.name: named[p.name] for p in fn.params if p.is_constexpr and p.name in named}


def key_collisions(launches: Sequence[Launch]) -> list[str]:
    """Launches of one shape that read the same tuned entry while their constexprs differ (one winner serves both).

    Grouped by shape: one process trains one model, and each autotuner's cache lives in that process.
    """
    groups: dict = {}
    for launch in launches:
        if launch.key is None:
            continue
        cx = tuple(sorted((k, str(v)) for k, v in launch.constexprs.items()))
        groups.setdefault((launch.shape, launch.kernel, launch.key), {}).setdefault(cx, []).append(launch.where)
    found = []
    for (shape, kernel, key), by_cx in groups.items():
        if len(by_cx) < 2:
            continue
        sets = [dict(cx) for cx in by_cx]
        differ = sorted({k for s in sets for k in s if len({str(t.get(k)) for t in sets}) > 1})
        parts = [f"{sorted(set(wheres))[0]}: " + " ".join(f"{k}={dict(cx).get(k)}" for k in differ)
                 for cx, wheres in by_cx.items()]  # fmt: skip
        found.append(f"{kernel} at {shape}, key {key}: {len(by_cx)} constexpr sets ({', '.join(differ)}) share one "
                     f"tuned config: " + " | ".join(parts))  # fmt: skip
    return found


def _unwrap(fn):
    """The JITFunction under an autotuner (or heuristics) wrapper."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


class _Recorder:
    """Autotuner.run / JITFunction.run replaced by a recorder for the duration of one capture."""

    def __init__(self):
        self.calls: list[dict] = []

    @contextlib.contextmanager
    def patched(self, host, kernels, break_rank_block: int | None):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        calls = self.calls

        def record_tuned(tuner, *args, **kwargs):
            grid = kwargs.pop("grid")
            kwargs.pop("warmup", None)
            calls.append(
                dict(
                    fn=_unwrap(tuner.fn), tuner=tuner, args=args, kwargs=kwargs, grid=grid, configs=list(tuner.configs)
                )
            )

        def record_jit(fn, *args, grid, warmup, **kwargs):
            calls.append(dict(fn=fn, tuner=None, args=args, kwargs=kwargs, grid=grid, configs=[None]))

        saved = (Autotuner.run, JITFunction.run, host.triton_unsupported_reason, kernels.rank_block)
        Autotuner.run, JITFunction.run = record_tuned, record_jit
        host.triton_unsupported_reason = lambda *a, **k: None  # CPU activations: the launcher would refuse them
        if break_rank_block is not None:
            kernels.rank_block = lambda rank: break_rank_block
        try:
            yield
        finally:
            Autotuner.run, JITFunction.run, host.triton_unsupported_reason, kernels.rank_block = saved


@dataclass
class Layer:
    """A model shape's own experts module (frozen, on meta) and its routing sizes, from `backbones.shapes`."""

    name: str
    experts: object
    num_experts: int
    top_k: int
    hidden: int
    projections: dict


def load_layer(name: str):
    from hellora_pl.backbones.meta import meta_architecture
    from hellora_pl.backbones.shapes import meta_model, shape_config

    config = shape_config(name)
    arch = meta_architecture(config)
    layer = arch.moe_layers(meta_model(config))[0]
    experts = layer.experts.requires_grad_(False)
    shapes = arch.expert_shapes(experts)
    return Layer(name, experts, arch.num_experts(config), arch.top_k(config), shapes["down_proj"][0], shapes)


def triton_refusal(layer: Layer, x) -> str | None:
    """Why the launcher would run this layer in torch, apart from the CPU device (checked as on a GPU)."""
    from hellora_pl.kernels import triton_host

    saved = triton_host._interpreting
    triton_host._interpreting = lambda: True  # passes the device check only; every other check is the launcher's
    try:
        return triton_host.triton_unsupported_reason(layer.experts, x)
    finally:
        triton_host._interpreting = saved


def capture(layer: Layer, dtype, train: bool, tokens: int, rank: int, hot: int, break_rank_block=None) -> list[dict]:
    """The launches one layer call makes: forward + backward (train) or a no-grad forward (eval)."""
    import torch

    from hellora_pl.adapters.experts import EXPERT_ADAPTER_ATTR, ExpertLoRA
    from hellora_pl.kernels import triton_host
    from hellora_pl.kernels import triton_jit as K

    experts = layer.experts.to(dtype)
    hot_experts = list(range(layer.num_experts))[:: max(1, layer.num_experts // hot)][:hot]
    lora = ExpertLoRA(layer.projections, layer.num_experts, hot_experts, rank, 2.0, dtype=torch.float32)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, layer.hidden, generator=gen).to(dtype)
    scores = torch.randn(tokens, layer.num_experts, generator=gen).softmax(-1)
    weights, index = torch.topk(scores, layer.top_k, dim=-1)
    setattr(experts, EXPERT_ADAPTER_ATTR, lora)
    recorder = _Recorder()
    try:
        why = triton_refusal(layer, x)
        if why is not None:
            raise SystemExit(f"compile gate: shape {layer.name}: the launcher would not run Triton here ({why})")
        with recorder.patched(triton_host, K, break_rank_block):
            if train:
                x.requires_grad_()
                weights.requires_grad_()
                triton_host.triton_adapted_experts_forward(experts, x, index, weights).float().sum().backward()
            else:
                with torch.no_grad():
                    triton_host.triton_adapted_experts_forward(experts, x, index, weights)
    finally:
        delattr(experts, EXPERT_ADAPTER_ATTR)
    if not recorder.calls:
        raise SystemExit(f"compile gate: shape {layer.name}: no kernel launch was recorded (the torch path ran)")
    return recorder.calls


# -- 2. expand: targets, configs, specialization ---------------------------------------------


@dataclass
class Spec:
    """One compile: a kernel specialized for a launch, a config and a target."""

    kernel: str
    cc: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    cx: dict  # constexpr name -> value, for the table
    num_warps: int
    num_stages: int
    grid: tuple

    def identity(self) -> str:
        cx = sorted((k, str(v)) for k, v in self.cx.items())
        return repr((self.kernel, self.cc, self.signature, cx, sorted(self.attrs.items(), key=str),
                     sorted(self.options.items(), key=str)))  # fmt: skip


class Specializer:
    """Triton's own binder and argument packing for a CUDA backend of each target (as JITFunction.run does)."""

    def __init__(self):
        self._binders: dict = {}

    def spec(self, call: dict, config, cc: int) -> Spec:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        fn = call["fn"]
        if (fn, cc) not in self._binders:
            backend = make_backend(GPUTarget("cuda", cc, 32))
            self._binders[fn, cc] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
        backend, binder = self._binders[fn, cc]
        kwargs = {**call["kwargs"], **(config.all_kwargs() if config is not None else {})}
        bound, specialization, options = binder(*call["args"], **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        grid = call["grid"]
        grid = tuple(grid(bound) if callable(grid) else grid)
        grid += (1,) * (3 - len(grid))
        return Spec(
            kernel=fn.__name__, cc=cc, signature=signature, constexprs=constexprs, attrs=attrs,
            options=dict(options.__dict__), cx={fn.arg_names[p[0]]: v for p, v in constexprs.items()},
            num_warps=options.num_warps, num_stages=options.num_stages, grid=grid,
        )  # fmt: skip


def expand(call: dict, launch: Launch, ccs: Sequence[int], specializer: Specializer) -> None:
    """Per target: the configs `fitting_configs` keeps (specialized) and those it drops."""
    from hellora_pl.kernels import triton_jit as K

    tuner = call["tuner"]
    named = {**dict(zip(tuner.arg_names, call["args"])), **call["kwargs"]} if tuner is not None else {}
    for cc in ccs:
        configs = call["configs"]
        kept = K.fitting_configs(launch.kernel, configs, named, SMEM_LIMIT[cc], cc=cc) if tuner is not None else configs
        launch.pruned += [(cc, c) for c in configs if c not in kept]
        if not kept:
            launch.unfit.append(cc)
        launch.variants += [(cc, specializer.spec(call, c, cc)) for c in kept]


def auto_tokens(num_experts: int, top_k: int) -> list[int]:
    """Token counts at which the launcher picks BLOCK_M 64, 32 and 16 for this layer (see AUTO_ROWS_PER_EXPERT)."""
    return [-(-rows * num_experts // top_k) for rows in AUTO_ROWS_PER_EXPERT]


def gather(args: argparse.Namespace) -> tuple[list[Launch], dict]:
    """Capture every (shape, dtype, mode, tokens) and expand the compiled token counts' launches."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    specializer = Specializer()
    launches, block_m = [], {}
    for name in args.shapes:
        layer = load_layer(name)
        hot = min(args.hot, layer.num_experts)
        token_list = args.token_list or auto_tokens(layer.num_experts, layer.top_k)
        key_tokens = [t for t in args.key_tokens if t not in token_list]
        for dname in args.dtype_list:
            for mode in args.mode_list:
                for tokens in token_list + key_tokens:
                    calls = capture(layer, dtypes[dname], mode == "train", tokens, args.rank, hot,
                                    args.break_rank_block)  # fmt: skip
                    for call in calls:
                        fn = call["fn"]
                        launch = Launch(
                            kernel=fn.__name__, shape=name, use=f"{dname}/{mode}", tokens=tokens,
                            key=autotune_key(call["tuner"], call["args"], call["kwargs"]),
                            constexprs=launch_constexprs(fn, call["args"], call["kwargs"]),
                        )  # fmt: skip
                        if tokens in token_list and (not args.kernels or fn.__name__ in args.kernels):
                            expand(call, launch, args.ccs, specializer)
                        if tokens in token_list and "BLOCK_M" in launch.constexprs:  # the routing's block
                            block_m.setdefault(name, set()).add(launch.constexprs["BLOCK_M"])
                        launches.append(launch)
                    del calls
    return launches, {k: sorted(v) for k, v in block_m.items()}


# -- 3. compile ------------------------------------------------------------------------------

_SPECS: list[Spec] = []  # read by the forked workers
_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _jit_function(name: str):
    from hellora_pl.kernels import triton_jit as K

    return _unwrap(getattr(K, name))


def compile_one(index: int) -> dict:
    """Compile `_SPECS[index]`; registers and spills from the ptxas log, shared memory from the metadata."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _SPECS[index]
    src = ASTSource(fn=_jit_function(spec.kernel), signature=spec.signature, constexprs=spec.constexprs,
                    attrs=spec.attrs)  # fmt: skip
    out = {"registers": None, "spill_stores": None, "spill_loads": None, "shared": None, "error": None, "ptxas": ""}
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", spec.cc, 32), options=spec.options)
        out["shared"] = int(kernel.metadata.shared)
        text = log.getvalue()
        regs, spills = _REGS.findall(text), _SPILL.findall(text)
        if not regs:
            out["error"] = "no ptxas log (was the kernel served from a cache?)"
        else:
            out["registers"] = max(int(r) for r in regs)
            out["spill_stores"] = max((int(s) for s, _ in spills), default=0)
            out["spill_loads"] = max((int(ld) for _, ld in spills), default=0)
        out["ptxas"] = " ".join(sorted(set(re.findall(r"\(C\d{4}\)", text))))
    except Exception as exc:  # noqa: BLE001 - every compiler failure is a finding to report
        out["error"] = _describe(exc)
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def _describe(exc: BaseException) -> str:
    """One line: the exception's first line (where) and the deepest cause's message (what the compiler refused)."""

    def lines(e: BaseException) -> list[str]:
        return [ln.strip() for ln in str(e).splitlines() if ln.strip() and set(ln.strip()) - set("^~")]

    text = f"{type(exc).__name__}: {(lines(exc) or [''])[0]}"
    deepest = exc
    while (deepest.__cause__ or deepest.__context__) is not None:
        deepest = deepest.__cause__ or deepest.__context__
    if deepest is not exc and lines(deepest):
        text += f" <- {type(deepest).__name__}: {lines(deepest)[-1]}"
    return " ".join(text.split()).replace("|", "/")[:400]


def compile_all(specs: list[Spec], jobs: int) -> list[dict]:
    import multiprocessing

    _SPECS[:] = specs
    if jobs == 1 or len(specs) <= 1:
        return [compile_one(i) for i in range(len(specs))]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(compile_one, range(len(specs)), chunksize=1)


# -- 4. check and report ---------------------------------------------------------------------


def cx_text(cx: dict) -> str:
    return " ".join(f"{short}{int(cx[k]) if isinstance(cx[k], bool) else cx[k]}" for k, short in _SHORT.items()
                    if k in cx)  # fmt: skip


def _grid_problem(grid: tuple) -> str | None:
    if min(grid) < 1 or any(g > m for g, m in zip(grid, GRID_MAX)):
        return f"grid {'x'.join(map(str, grid))} out of range (x < 2^31, y and z <= 65535, all >= 1)"
    return None


def build_rows(launches: list[Launch], results: dict, spill_fails: Sequence[str]) -> tuple[list[dict], list[str]]:
    """Table rows (one per compiled variant, pruned config and unfit launch) and the failures found."""
    rows: dict[str, dict] = {}
    failures = []
    for launch in launches:
        for cc, spec in launch.variants:
            ident = spec.identity()
            row = rows.setdefault(ident, {
                "kernel": spec.kernel, "shapes": set(), "cc": cc, "uses": set(), "constexprs": cx_text(spec.cx),
                "warps": spec.num_warps, "stages": spec.num_stages, "grid": spec.grid, "limit": SMEM_LIMIT[cc],
                **results.get(ident, {"skipped": True}), "problems": [],
            })  # fmt: skip
            row["shapes"].add(launch.shape)
            row["uses"].add(launch.use)
            row["grid"] = tuple(max(a, b) for a, b in zip(row["grid"], spec.grid))
            grid = _grid_problem(spec.grid)
            if grid and grid not in row["problems"]:
                row["problems"].append(grid)
        for cc, config in launch.pruned:
            cfg = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
            key = f"pruned {launch.kernel} {cc} {launch.shape} {cx_text(launch.constexprs)} {cfg} {config.num_warps}"
            row = rows.setdefault(key, {
                "kernel": launch.kernel, "shapes": set(), "cc": cc, "uses": set(),
                "constexprs": cx_text({**launch.constexprs, **config.kwargs}),
                "warps": config.num_warps, "stages": config.num_stages, "grid": None, "limit": SMEM_LIMIT[cc],
                "pruned": True, "problems": [],
            })  # fmt: skip
            row["shapes"].add(launch.shape)
            row["uses"].add(launch.use)
        for cc in launch.unfit:
            failures.append(f"{launch.kernel} ({launch.where}, {cx_text(launch.constexprs)}): no autotune config fits "
                            f"sm_{cc}'s {SMEM_LIMIT[cc]} B of shared memory")  # fmt: skip
    out = []
    for row in rows.values():
        problems = row.pop("problems")
        if row.get("pruned"):
            status = [f"pruned for sm_{row['cc']}"]
        elif row.get("skipped"):
            status = ["not compiled (--max-variants)"]
        else:
            if row["error"]:
                problems.append(f"COMPILE ERROR {row['error']}")
            if row["shared"] is not None and row["shared"] > row["limit"]:
                problems.append(f"SHARED {row['shared']} B > {row['limit']} B (kept by fitting_configs)")
            spilled = bool(row["spill_stores"] or row["spill_loads"])
            if spilled and any(f"{d}/train" in row["uses"] for d in spill_fails):
                problems.append("SPILL in a training dtype")
            status = (
                problems + (["spills"] if spilled and not problems else []) + ([row["ptxas"]] if row["ptxas"] else [])
            )
        for problem in problems:
            where = f"w{row['warps']}/s{row['stages']} ({','.join(sorted(row['uses']))})"
            failures.append(f"{row['kernel']} sm_{row['cc']} {row['constexprs']} {where}: {problem}")
        row["status"] = "; ".join(status) or "ok"
        row["failed"] = bool(problems)
        row["shapes"], row["uses"] = sorted(row["shapes"]), sorted(row["uses"])
        row["grid"] = "x".join(map(str, row["grid"])) if row["grid"] else "-"
        out.append(row)
    return out, failures


def markdown(rows: list[dict]) -> str:
    headers = ["kernel", "shape", "cc", "dtype/uses", "constexprs", "warps/stages", "grid", "registers",
               "spill st/ld B", "shared B", "limit B", "status"]  # fmt: skip
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    pruned: dict[tuple, int] = {}
    for r in rows:
        if r.get("pruned"):  # counted below, not one row each: they are most of a full run
            pruned[(r["kernel"], r["cc"])] = pruned.get((r["kernel"], r["cc"]), 0) + 1
            continue
        spill = "-" if r.get("spill_stores") is None else f"{r['spill_stores']}/{r['spill_loads']}"
        cells = [r["kernel"], ",".join(s.split("-")[0] for s in r["shapes"]), r["cc"], ",".join(r["uses"]),
                 r["constexprs"], f"{r['warps']}/{r['stages']}", r["grid"], r.get("registers") or "-", spill,
                 r.get("shared") or "-", r["limit"], r["status"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if pruned:
        counts = "; ".join(f"{kernel} sm_{cc}: {n}" for (kernel, cc), n in sorted(pruned.items()))
        lines.append(f"\nConfigs dropped by `fitting_configs` (too large for the target's shared memory, or tuned for "
                     f"the other kind of dot; listed one by one in the JSON): {counts}.")  # fmt: skip
    return "\n".join(lines)


def summarize(args, rows, failures, collisions, block_m, times, versions) -> dict:
    compiled = [r for r in rows if not r.get("pruned") and not r.get("skipped")]
    spilling = [r for r in compiled if r["spill_stores"] or r["spill_loads"]]
    return {
        "result": "FAIL" if failures or collisions else "PASS",
        "variants_compiled": len(compiled),
        "variants_not_compiled": sum(1 for r in rows if r.get("skipped")),
        "configs_pruned": sum(1 for r in rows if r.get("pruned")),
        "compile_errors": sum(1 for r in compiled if r["error"]),
        "over_shared_limit": sum(1 for r in compiled if r["shared"] is not None and r["shared"] > r["limit"]),
        "no_config_fits": sum(1 for f in failures if "no autotune config fits" in f),
        "grid_out_of_range": sum(1 for f in failures if "out of range" in f),
        "spilling": len(spilling),
        "spilling_failing": sum(1 for r in spilling if "SPILL" in r["status"]),
        "at_255_registers": sum(1 for r in compiled if r["registers"] == 255),
        "key_collisions": len(collisions),
        "block_m_by_shape": block_m,
        "seconds": times,
        "jobs": args.jobs,
        **versions,
    }


def summary_line(s: dict, args) -> str:
    block_m = ", ".join(f"{k} " + "/".join(map(str, v)) for k, v in s["block_m_by_shape"].items())
    return (
        f"**{s['result']}**: {s['variants_compiled']} variants compiled, {s['configs_pruned']} configs pruned "
        f"({','.join(args.shapes)}; {args.dtypes}; {args.modes}; sm {args.cc}; tokens {args.tokens}); "
        f"compile errors {s['compile_errors']}; over shared memory {s['over_shared_limit']}; no config fits "
        f"{s['no_config_fits']}; grid out of range {s['grid_out_of_range']}; spilling {s['spilling']} "
        f"({s['spilling_failing']} in training {'/'.join(args.spill_fails)}: fail); at 255 registers "
        f"{s['at_255_registers']}; autotune-key collisions {s['key_collisions']}; BLOCK_M {block_m}; "
        f"capture {s['seconds']['capture']}s, "
        f"compile {s['seconds']['compile']}s, total {s['seconds']['total']}s (jobs {s['jobs']}); triton "
        f"{s['triton']}, torch {s['torch']}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    cache = prepare_environment()
    try:
        import torch
        import triton

        from hellora_pl.kernels import triton_jit as K

        if K.INTERPRET:
            raise SystemExit("compile gate: triton_jit was imported under TRITON_INTERPRET=1 in this process; "
                             "run the gate in a fresh process without it")  # fmt: skip
        try:
            ptxas = triton.knobs.nvidia.ptxas.path
        except Exception as exc:  # noqa: BLE001 - triton raises its own error types for a missing tool
            raise SystemExit(
                f"compile gate: ptxas not found ({exc}); install the triton wheel, which ships it"
            ) from exc
        unknown = [k for k in args.kernels if not hasattr(K, k)]
        if unknown:
            raise SystemExit(f"compile gate: --kernel {unknown}: not kernels of hellora_pl.kernels.triton_jit")
        if args.break_rank_block is not None:
            print(f"compile gate: test hook {BREAK_RANK_BLOCK_ENV}: rank_block returns {args.break_rank_block}",
                  file=sys.stderr)  # fmt: skip

        launches, block_m = gather(args)
        collisions = key_collisions([la for la in launches if not args.kernels or la.kernel in args.kernels])
        t_capture = time.perf_counter() - start
        specs: dict[str, Spec] = {}
        for launch in launches:
            for _, spec in launch.variants:
                specs.setdefault(spec.identity(), spec)
        chosen = list(specs)[: args.max_variants]
        print(f"compile gate: {len(launches)} launches captured, {len(specs)} unique variants, compiling "
              f"{len(chosen)} with {args.jobs} jobs ({t_capture:.1f}s)", file=sys.stderr)  # fmt: skip
        t0 = time.perf_counter()
        results = dict(zip(chosen, compile_all([specs[i] for i in chosen], args.jobs)))
        t_compile = time.perf_counter() - t0

        rows, failures = build_rows(launches, results, args.spill_fails)
        times = {"capture": round(t_capture, 1), "compile": round(t_compile, 1),
                 "total": round(time.perf_counter() - start, 1)}  # fmt: skip
        versions = {"triton": triton.__version__, "torch": torch.__version__, "ptxas": str(ptxas)}
        summary = summarize(args, rows, failures, collisions, block_m, times, versions)
        text = summary_line(summary, args) + "\n\n" + markdown(rows)
        if failures:
            text += "\n\nFailures:\n" + "\n".join(f"- {f}" for f in failures)
        if collisions:
            text += "\n\nAutotune-key collisions (launches that share one tuned config):\n"
            text += "\n".join(f"- {c}" for c in collisions)
        if args.break_rank_block is not None:
            text += f"\n\nTest hook {BREAK_RANK_BLOCK_ENV}={args.break_rank_block}: rank_block was broken on purpose."
        print(text)
        if args.out is not None:
            write(Path(args.out), args, argv, summary, rows, failures, collisions, text)
        return 1 if summary["result"] == "FAIL" else 0
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def write(out: Path, args, argv, summary, rows, failures, collisions, text) -> None:
    command = "python benchmarks/compile_gate.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {"command": command.strip(), "options": {k: v for k, v in vars(args).items() if _plain(v)},
               "summary": summary, "failures": failures, "key_collisions": collisions, "rows": rows}  # fmt: skip
    rows_text = ",\n".join("  " + json.dumps(row, default=str, separators=(",", ":")) for row in payload.pop("rows"))
    head = json.dumps(payload, indent=2, default=str)  # then one line per row: a full run has ~2,000 rows
    (out / "compile_gate.json").write_text(f'{head[:-2]},\n"rows": [\n{rows_text}\n]\n}}\n')
    title = "# Compile gate: the expert-path kernels compiled for GPU targets without a GPU\n\n"
    (out / "compile_gate.md").write_text(f"{title}Command: `{command.strip()}`\n\n{text}\n")
    print(f"wrote {out / 'compile_gate.json'} and {out / 'compile_gate.md'}", file=sys.stderr)


def _plain(value) -> bool:
    return isinstance(value, (str, int, float, bool, list, type(None)))


if __name__ == "__main__":
    sys.exit(main())
