"""The budget's arguments, checked with the flag to fix, and resolved into plan settings."""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters.methods import PlanSettings, method_defaults, resolve_method
from ..adapters.plan import DynamicRankSpec, LoRISpec
from ..routing import CoveragePerLayer, TopKPerLayer

HOT_K_METHODS = ("hellora", "hellori")


@dataclass(frozen=True)
class BudgetArguments:
    """The method and its overrides as given on the command line (None: the default)."""

    method: str = "lora"
    rank: int = 8
    hot_k: int | None = None
    router_rank: int | None = None
    no_router: bool = False
    esft_coverage: float = 0.2
    lori_density: float = 0.1
    rank_max: int | None = None


def check_arguments(args: BudgetArguments, num_experts: int, top_k: int) -> tuple[int, int]:
    """Raise with the flag to change for a bad value; returns (hot_k, rank_max) with defaults filled."""
    method_defaults(args.method)  # an unknown method first
    if args.rank < 1:
        raise ValueError(f"--rank must be at least 1, got {args.rank}.")
    if args.router_rank is not None and args.router_rank < 1:
        raise ValueError(
            f"--router-rank must be at least 1, got {args.router_rank}; use --no-router to freeze the router."
        )
    if not 0 < args.esft_coverage <= 1:
        raise ValueError(f"--esft-coverage must be in (0, 1], got {args.esft_coverage}.")
    if not 0 < args.lori_density <= 1:
        raise ValueError(f"--lori-density must be in (0, 1], got {args.lori_density}.")
    hot_k = top_k if args.hot_k is None else args.hot_k
    if args.method in HOT_K_METHODS and not 1 <= hot_k <= num_experts:
        raise ValueError(
            f"--hot-k {hot_k} is outside 1..{num_experts} (the model's experts per layer); choose one there."
        )
    rank, rank_max = args.rank, 2 * args.rank if args.rank_max is None else args.rank_max
    if method_defaults(args.method).dynamic_rank and rank_max < rank:
        raise ValueError(
            f"--rank-max {rank_max} is below --rank {rank}: DR-LoRA's ranks grow to fill r={rank}; "
            f"choose --rank-max >= {rank}."
        )
    return hot_k, rank_max


def plan_settings(args: BudgetArguments, hot_k: int, rank_max: int) -> PlanSettings:
    """The plan settings a fit would use for these arguments (`resolve_method`), alpha = rank."""
    defaults = method_defaults(args.method)
    if args.method in HOT_K_METHODS:
        policy = TopKPerLayer(k=hot_k)
    elif args.method == "esft":
        policy = CoveragePerLayer(coverage=args.esft_coverage, by="count")
    else:
        policy = None  # the method's own
    if args.router_rank is not None and args.no_router:
        raise ValueError("Give --router-rank or --no-router, not both.")
    router = False if args.no_router else (True if args.router_rank is not None else None)
    return resolve_method(
        args.method,
        rank=args.rank,
        alpha=args.rank,
        hot_experts=policy,
        router=router,
        router_rank=args.router_rank,
        lori=LoRISpec(args.lori_density, "model", masked=True) if defaults.lori else None,
        dynamic_rank=DynamicRankSpec.for_rank(args.rank, rank_max=rank_max) if defaults.dynamic_rank else None,
    )
