"""`python -m hellora_pl.budget`: the command line over `budget`."""

from __future__ import annotations

import argparse
import json
import sys

from ..adapters import METHODS
from ..backbones.meta import meta_architecture
from ..backbones.shapes import SHAPES, meta_model, usable_shapes
from ..memory import QUANTIZATIONS, MemorySettings
from .backbone import load_config, one_line
from .profile import read_profile
from .report import budget
from .text import format_text


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hellora_pl.budget",
        description="Trainable parameters, adapter FLOPs per token and base memory of a method on an MoE "
        "backbone, before any training. The counting rules are in the docstring of hellora_pl/budget/__init__.py.",
        allow_abbrev=False,
    )
    backbone = parser.add_mutually_exclusive_group(required=True)
    backbone.add_argument("--shape", help=shape_help())
    backbone.add_argument("--config", help="a local config.json, or a directory holding one")
    backbone.add_argument("--model", help="a Hugging Face hub id (reads its config.json; needs the network)")
    parser.add_argument("--method", default="lora", choices=METHODS, help="default: lora")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8); alpha = rank")
    parser.add_argument(
        "--hot-k",
        type=int,
        default=None,
        help="hellora/hellori: hot experts per MoE layer (default: the model's routing top-k)",
    )
    parser.add_argument("--router-rank", type=int, default=None, help="router LoRA rank (default: --rank)")
    parser.add_argument("--no-router", action="store_true", help="leave the router frozen")
    parser.add_argument("--profile", default=None, help="a saved routing_profile.json (default: uniform routing)")
    parser.add_argument(
        "--esft-coverage",
        type=float,
        default=0.2,
        help="esft: share of each layer's selections its experts cover (default 0.2)",
    )
    parser.add_argument("--lori-density", type=float, default=0.1, help="hellori: kept share of B (default 0.1)")
    parser.add_argument(
        "--rank-max", type=int, default=None, help="dr_lora: largest per-expert rank (default 2 x rank)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_memory_arguments(parser)
    return parser


def shape_help() -> str:
    """The built-in shapes --shape takes now, and those recorded whose model type is not supported yet."""
    usable = usable_shapes()
    pending = [name for name, shape in SHAPES.items() if not shape.remote_code and name not in usable]
    text = f"a built-in shape: {', '.join(usable)}"
    if pending:
        text += f" (recorded, refused until their model types are supported: {', '.join(pending)})"
    return text


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory (with --memory; counting rules in hellora_pl/memory.py)")
    group.add_argument("--memory", action="store_true", help="add the predicted peak GPU memory of a training step")
    group.add_argument("--batch-size", type=int, default=1, help="sequences per rank (default 1)")
    group.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    group.add_argument("--dtype", default="bfloat16", help="base weights: bfloat16 (default), float16, float32")
    group.add_argument("--adapter-dtype", default="float32", help="adapters: float32 (default), bfloat16, float16")
    group.add_argument("--quantization", default="none", choices=QUANTIZATIONS, help="4-bit base (default none)")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute each decoder layer")
    group.add_argument("--fsdp", type=int, default=1, help="ranks sharing weights, grads and optimizer (default 1)")


def run(args: argparse.Namespace) -> dict:
    config, source = load_config(args.shape, args.config, args.model)
    meta_architecture(config, source)  # registered or detected; refused by name otherwise
    model = meta_model(config)
    profile = read_profile(args.profile) if args.profile is not None else None
    return budget(
        model,
        method=args.method,
        rank=args.rank,
        hot_k=args.hot_k,
        router_rank=args.router_rank,
        no_router=args.no_router,
        profile=profile,
        esft_coverage=args.esft_coverage,
        lori_density=args.lori_density,
        rank_max=args.rank_max,
        source=source,
        profile_path=args.profile,
        memory=memory_settings(args) if args.memory else None,
    )


def memory_settings(args: argparse.Namespace) -> MemorySettings:
    return MemorySettings(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype,
        adapter_dtype=args.adapter_dtype,
        quantization=args.quantization,
        gradient_checkpointing=args.gradient_checkpointing,
        fsdp=args.fsdp,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except (ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"{parser.prog}: error: {one_line(exc)}\n")
        raise SystemExit(2) from None
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return report
