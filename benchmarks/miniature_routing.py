"""Is the miniature's routing real? Per-domain routing profiles of the shipped model, against its own init.

    python benchmarks/miniature_routing.py

profiles the routing of each domain's validation windows (``val_tokens.safetensors``) on the
pretrained model and on the same architecture at its pretraining seed's random init (routing there
already differs a little by domain, because token statistics do), and reports per MoE layer:

- each domain's hot set (the ``k`` most selected experts, HELLoRA's rule; k = the routing top-k);
- the overlap of two domains' hot sets (|A & B| / k) and the share of one domain's selections that
  land on another domain's hot set (what HELLoRA adapted for one task offers the other);
- the load entropy (H / log E: 1 is a uniform load) per domain.

Writes ``miniature_routing.json``, ``.md`` and ``.png`` (heatmaps, one panel per domain) under
``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, machine_markdown, markdown_table, write_results  # noqa: E402

from hellora_pl.backbones import BackboneConfig  # noqa: E402
from hellora_pl.loading import load_backbone  # noqa: E402
from hellora_pl.routing import RoutingProfile, TopKPerLayer  # noqa: E402
from hellora_pl.routing.profile import RoutingRecorder  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "hellora-mini-olmoe"


def domain_profiles(model, windows: dict[str, torch.Tensor], chunk: int = 16) -> dict[str, RoutingProfile]:
    profiles = {}
    with torch.no_grad(), RoutingRecorder(model) as recorder:
        for domain, tokens in windows.items():
            recorder.armed = True
            for start in range(0, len(tokens), chunk):
                model(input_ids=tokens[start : start + chunk].long())
            recorder.armed = False
            profiles[domain] = recorder.take()
    return profiles


def entropy(load: torch.Tensor) -> list[float]:
    """Per layer, the load's entropy over log E (1: every expert equally used)."""
    p = load.clamp_min(1e-12)
    return (-(p * p.log()).sum(dim=1) / math.log(load.shape[1])).tolist()


def routing_stats(profiles: dict[str, RoutingProfile], k: int) -> dict:
    """Hot sets, pairwise overlaps and cross-coverage, entropy: per layer and averaged over layers."""
    policy = TopKPerLayer(k)
    hot = {d: policy.select(p) for d, p in profiles.items()}
    loads = {d: p.load() for d, p in profiles.items()}
    layers = next(iter(profiles.values())).layers
    pairs = {}
    for a, b in itertools.combinations(profiles, 2):
        overlap = [len(set(x) & set(y)) / k for x, y in zip(hot[a], hot[b])]
        pairs[f"{a}/{b}"] = {"overlap": overlap, "mean_overlap": sum(overlap) / len(overlap)}
    coverage = {}
    for a, b in itertools.permutations(profiles, 2):  # share of a's selections on b's hot set
        share = [float(loads[a][row, hot[b][row]].sum()) for row in range(len(layers))]
        coverage[f"{a} on {b}"] = {"per_layer": share, "mean": sum(share) / len(share)}
    own = {d: sum(float(loads[d][row, hot[d][row]].sum()) for row in range(len(layers))) / len(layers) for d in profiles}
    return {
        "layers": layers,
        "k": k,
        "hot": hot,
        "pairs": pairs,
        "coverage": coverage,
        "own_hot_share": own,
        "entropy": {d: entropy(loads[d]) for d in profiles},
        "profiles": {d: p.to_dict() for d, p in profiles.items()},
    }


def heatmaps(stats_by_model: dict[str, dict], path: Path) -> None:
    """One panel per (model, domain): layers x experts, the share of selections, one colour scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(stats_by_model)
    domains = list(stats_by_model[models[0]]["profiles"])
    loads = {(m, d): RoutingProfile.from_dict(stats_by_model[m]["profiles"][d]).load().numpy() for m in models for d in domains}
    num_layers, num_experts = next(iter(loads.values())).shape
    vmax = max(float(v.max()) for v in loads.values())
    figure = Figure(figsize=(4.2 * len(domains) + 1, 1.2 + 0.55 * num_layers * len(models)), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(models), len(domains), squeeze=False)
    for row, model in enumerate(models):
        hot = stats_by_model[model]["hot"]
        for col, domain in enumerate(domains):
            ax = axes[row][col]
            image = ax.imshow(loads[model, domain], cmap="viridis", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
            for layer_row, experts in enumerate(hot[domain]):
                ax.scatter(experts, [layer_row] * len(experts), marker="s", s=28, facecolors="none", edgecolors="red", linewidths=1.2)
            ax.set_title(f"{model}: {domain}", fontsize=9)
            ax.set_yticks(range(num_layers))
            ax.set_yticklabels([str(x) for x in stats_by_model[model]["layers"]], fontsize=7)
            ax.set_xticks(range(0, num_experts, max(1, num_experts // 8)))
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("layer")
            if row == len(models) - 1:
                ax.set_xlabel("expert")
    figure.colorbar(image, ax=axes, fraction=0.02, pad=0.01).set_label("share of the layer's selections")
    figure.suptitle("Routing of each domain's validation text; red squares: the domain's hot set (top-k)", fontsize=10)
    figure.savefig(path)


def initial_model(model_dir: Path, seed: int):
    """The same architecture at the pretraining seed's random init (what pretraining started from)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def summary_rows(stats_by_model: dict[str, dict]) -> list[list[str]]:
    rows = []
    for model, stats in stats_by_model.items():
        for pair, values in stats["pairs"].items():
            a, b = pair.split("/")
            rows.append(
                [
                    model,
                    pair,
                    f"{values['mean_overlap']:.2f}",
                    " ".join(f"{x:.2f}" for x in values["overlap"]),
                    f"{stats['coverage'][f'{a} on {b}']['mean']:.2f} / {stats['own_hot_share'][a]:.2f}",
                    f"{stats['coverage'][f'{b} on {a}']['mean']:.2f} / {stats['own_hot_share'][b]:.2f}",
                ]
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a folder written by pretrain_miniature.py")
    parser.add_argument("--k", type=int, default=None, help="hot-set size per layer (default: the routing top-k)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="miniature_routing")
    args = parser.parse_args(argv)
    card_path, tokens_path = args.model / "card.json", args.model / "val_tokens.safetensors"
    for path in (card_path, tokens_path):
        if not path.is_file():
            parser.error(f"{path} not found: --model must be a folder written by benchmarks/pretrain_miniature.py")
    card = json.loads(card_path.read_text())
    started = time.monotonic()
    torch.set_num_threads(card["recipe"].get("threads", 2))
    windows = load_file(str(tokens_path))
    models = {
        "pretrained": load_backbone(BackboneConfig(pretrained=str(args.model))).eval(),
        "init (same seed)": initial_model(args.model, card["recipe"]["seed"]),
    }
    k = args.k or card["recipe"]["top_k"]
    if not 1 <= k <= card["recipe"]["experts"]:
        parser.error(f"--k {k} must be between 1 and the number of experts ({card['recipe']['experts']})")
    stats = {name: routing_stats(domain_profiles(model, windows), k) for name, model in models.items()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    png = args.out_dir / f"{args.name}.png"
    heatmaps(stats, png)
    headers = ["model", "domains A/B", "hot-set overlap (mean)", "per layer", "A's selections on B's hot set / on its own", "B's on A's / on its own"]
    entropy_rows = [[m, d, " ".join(f"{x:.3f}" for x in s["entropy"][d])] for m, s in stats.items() for d in s["entropy"]]
    info = machine_info(torch.device("cpu"), __file__, argv)
    markdown = "\n\n".join(
        [
            f"# Routing of {args.model.name} by domain\n\n{machine_markdown(info)}",
            f"Hot sets of k={k} experts per layer on each domain's validation windows ({len(next(iter(windows.values())))} x {next(iter(windows.values())).shape[1]} tokens).",
            markdown_table(headers, summary_rows(stats)),
            "Load entropy per layer (H / log E; 1 = uniform):",
            markdown_table(["model", "domain", "per layer"], entropy_rows),
            f"![routing heatmaps]({png.name})",
        ]
    )
    payload = {"machine": info, "model": str(args.model), "seconds": round(time.monotonic() - started, 1), "results": stats}
    json_path, md_path = write_results(args.out_dir, args.name, payload, markdown)
    print(markdown)
    print(f"wrote {json_path}, {md_path}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
