"""`python -m hellora_pl.budget`: figures against hand counts for OLMoE-1B-7B, routing skew, errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from hellora_pl.budget import main
from hellora_pl.routing import RoutingProfile

# OLMoE-1B-7B, counted by hand from its published shape (not from the model).
H, FF, L, E, K = 2048, 1024, 16, 64, 8  # hidden, expert width, layers, experts, top-k
R = 32
ATTENTION = L * 4 * R * (H + H)  # q, k, v, o: [2048, 2048] each
ROUTER = L * R * (E + H)  # router [64, 2048]
PER_EXPERT = R * (2 * FF + H) + R * (H + FF)  # fused gate_up [2 FF, H] and down [H, FF]
HELLORA_PARAMS = ATTENTION + ROUTER + L * 8 * PER_EXPERT
LORA_PARAMS = ATTENTION + ROUTER + L * E * PER_EXPERT
# Forward FLOPs per token: LoRA costs 2 r (in + out) = 2 x its parameters per row it acts on.
DENSE_FLOPS = 2 * (ATTENTION + ROUTER)  # every token
LORA_EXPERT_FLOPS = L * K * 2 * PER_EXPERT  # top_k selections per token, each through one adapted expert


def hellora_flops(hot_share: float) -> float:
    """HELLoRA's adapter FLOPs when its hot experts take `hot_share` of each layer's selections."""
    return DENSE_FLOPS + hot_share * LORA_EXPERT_FLOPS


def run_cli(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "hellora_pl.budget", *args],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def values(report: dict) -> dict:
    return {key: figure["value"] for key, figure in report["figures"].items()}


def budget_json(capsys, *args: str) -> dict:
    main(["--shape", "olmoe-1b-7b", "--rank", str(R), *args, "--json"])
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def cli_reports():
    common = ["--shape", "olmoe-1b-7b", "--rank", str(R), "--hot-k", "8", "--json"]
    return {method: run_cli(*common, "--method", method) for method in ("hellora", "lora")}


def test_cli_hellora_and_lora_match_hand_counts(cli_reports):
    hellora, lora = values(cli_reports["hellora"]), values(cli_reports["lora"])
    assert hellora["trainable_params"] == HELLORA_PARAMS == 38_830_080
    assert lora["trainable_params"] == LORA_PARAMS == 244_350_976
    assert hellora["lora_all_params"] == lora["lora_all_params"] == LORA_PARAMS
    assert hellora["trainable_vs_lora_all"] == pytest.approx(HELLORA_PARAMS / LORA_PARAMS)
    assert lora["trainable_vs_lora_all"] == pytest.approx(1.0)

    # Uniform routing: the 8 hot experts of 64 take 1/8 of the selections.
    assert cli_reports["hellora"]["routing"]["assumed"] == "uniform"
    assert hellora["adapted_selection_share"] == pytest.approx(8 / 64)
    assert lora["adapter_flops"] == lora["lora_all_adapter_flops"] == DENSE_FLOPS + LORA_EXPERT_FLOPS
    assert hellora["adapter_flops"] == pytest.approx(hellora_flops(8 / 64))
    assert hellora["adapter_flops_vs_lora_all"] == pytest.approx(
        hellora_flops(8 / 64) / (DENSE_FLOPS + LORA_EXPERT_FLOPS)
    )
    assert hellora["adapter_flops_attention"] == 2 * ATTENTION
    assert hellora["adapter_flops_router"] == 2 * ROUTER
    assert hellora["adapter_flops_shared_experts"] == 0


def test_cli_base_figures(cli_reports):
    base = values(cli_reports["lora"])
    experts = L * E * (2 * FF * H + H * FF)
    embeddings = 2 * 50304 * H  # input embedding and untied lm_head
    norms = L * 4 * H + H  # q_norm, k_norm, input and post-attention norms; final norm
    matrices = L * 4 * H * H + L * E * H + experts
    assert base["total_params"] == matrices + embeddings + norms
    assert base["active_params"] == matrices - experts + experts * K // E + 50304 * H + norms
    assert base["base_forward_flops"] == 2 * base["active_params"]
    assert base["base_weight_bytes_16bit"] == 2 * base["total_params"]
    assert base["base_weight_bytes_nf4"] == matrices * 9 // 16 + 2 * (embeddings + norms)  # 0.5625 B per weight
    assert base["adapter_flops_vs_base"] == pytest.approx(base["adapter_flops"] / base["base_forward_flops"])


def test_json_numbers_are_numbers(cli_reports):
    for figure in cli_reports["hellora"]["figures"].values():
        assert isinstance(figure["value"], (int, float)) and not isinstance(figure["value"], bool)
        assert figure["unit"] and figure["how"]


def test_text_table_has_one_line_per_figure(capsys):
    report = main(["--shape", "olmoe-1b-7b", "--method", "hellora", "--rank", str(R)])
    text = capsys.readouterr().out
    assert "routing    uniform" in text
    for figure in report["figures"].values():
        lines = [line for line in text.splitlines() if line.strip().startswith(figure["label"] + "  ")]
        assert len(lines) == 1 and figure["how"] in lines[0]
    assert "38,830,080" in text


def skewed_profile(path, hot: list[int], hot_share: float, tokens: int = 10_000) -> None:
    """Every layer sends `hot_share` of its selections to `hot`, the rest evenly to the others."""
    selections = tokens * K
    counts = torch.zeros(L, E, dtype=torch.int64)
    cold = [e for e in range(E) if e not in hot]
    counts[:, hot] = round(selections * hot_share / len(hot))
    counts[:, cold] = round(selections * (1 - hot_share) / len(cold))
    RoutingProfile(list(range(L)), counts, counts.double() / K, tokens, K).save(path)


def test_skewed_profile_changes_hellora_flops(tmp_path, capsys):
    hot = [3, 9, 17, 22, 40, 41, 50, 63]
    profile = tmp_path / "routing_profile.json"
    skewed_profile(profile, hot, hot_share=0.6)
    counts = torch.tensor(json.loads(profile.read_text())["counts"][0], dtype=torch.float64)
    share = float(counts[hot].sum() / counts.sum())  # 0.6 up to rounding of the counts
    report = budget_json(capsys, "--method", "hellora", "--hot-k", "8", "--profile", str(profile))
    figures = values(report)
    assert report["routing"]["assumed"] == "profile"
    assert report["settings"]["policy"] == {"name": "top_k", "k": 8}
    assert figures["adapted_selection_share"] == pytest.approx(share)
    assert figures["trainable_params"] == HELLORA_PARAMS  # placement changes, the count does not
    assert figures["adapter_flops_experts"] == pytest.approx(share * LORA_EXPERT_FLOPS)
    assert figures["adapter_flops"] == pytest.approx(hellora_flops(share))
    assert figures["adapter_flops_vs_lora_all"] == pytest.approx(
        hellora_flops(share) / (DENSE_FLOPS + LORA_EXPERT_FLOPS)
    )
    assert figures["adapter_flops_vs_lora_all"] > 0.6  # vs 0.338 under uniform routing

    lora = values(budget_json(capsys, "--method", "lora", "--profile", str(profile)))
    assert lora["adapter_flops"] == pytest.approx(DENSE_FLOPS + LORA_EXPERT_FLOPS)  # routing-independent


def test_attention_only(capsys):
    figures = values(budget_json(capsys, "--method", "attention_only"))
    assert figures["trainable_params"] == ATTENTION
    assert figures["adapter_flops"] == 2 * ATTENTION
    assert figures["adapter_flops_router"] == figures["adapter_flops_experts"] == 0


def test_hellori_counts_masked_b_and_dense_flops(capsys):
    report = budget_json(capsys, "--method", "hellori", "--hot-k", "8", "--lori-density", "0.1")
    figures = values(report)

    def kept(out: int) -> int:  # B only (A frozen), per matrix, mask in force
        return round(0.1 * R * out)

    expected = L * 4 * kept(H) + L * kept(E) + L * 8 * (kept(2 * FF) + kept(H))
    assert figures["trainable_params"] == expected == 2_100_560
    assert figures["adapter_params_allocated"] == HELLORA_PARAMS  # frozen A and dense B
    assert figures["adapter_flops"] == pytest.approx(hellora_flops(8 / 64))  # dense B
    assert any("dense B" in note for note in report["notes"])


def test_dr_lora_at_full_budget_equals_lora(capsys):
    report = budget_json(capsys, "--method", "dr_lora", "--rank-max", "64")
    figures = values(report)
    lora_experts = L * E * PER_EXPERT
    assert figures["trainable_params"] == LORA_PARAMS
    assert figures["trainable_params_at_start"] == ATTENTION + ROUTER + lora_experts // 2  # rank_init 16
    assert figures["adapter_params_allocated"] == ATTENTION + ROUTER + 2 * lora_experts  # r_max 64
    assert figures["adapter_flops"] == DENSE_FLOPS + LORA_EXPERT_FLOPS
    assert figures["adapter_flops_executed"] == DENSE_FLOPS + 2 * LORA_EXPERT_FLOPS
    assert report["settings"]["dynamic_rank"]["budget"] == L * E * R


def test_esft_full_rank_deltas_on_covering_experts(capsys):
    report = budget_json(capsys, "--method", "esft", "--esft-coverage", "0.2")
    figures = values(report)
    per_expert = 2 * FF * H + H * FF
    adapted = 13  # ceil(0.2 * 64) experts of 1/64 each reach 20% under uniform routing
    assert report["adapted_experts"] == {"total": L * adapted, "per_layer_min": adapted, "per_layer_max": adapted}
    assert figures["trainable_params"] == L * adapted * per_expert
    assert figures["adapter_flops"] == pytest.approx(L * K * adapted / E * 2 * per_expert)
    assert figures["adapter_flops_attention"] == figures["adapter_flops_router"] == 0


@pytest.mark.parametrize("shape", ["mixtral-8x7b", "deepseek-v2-lite", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b"])
def test_other_shapes_run(shape, capsys):
    main(["--shape", shape, "--method", "hellora", "--json"])
    figures = values(json.loads(capsys.readouterr().out))
    assert 0 < figures["trainable_vs_lora_all"] < 1
    assert 0 < figures["adapter_flops_vs_lora_all"] < 1


def test_config_path_file_and_directory(tmp_path, capsys):
    from hellora_pl.backbones.shapes import SHAPES

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe", **SHAPES["olmoe-1b-7b"].config}))
    for path in (tmp_path, tmp_path / "config.json"):
        main(["--config", str(path), "--method", "hellora", "--rank", str(R), "--json"])
        assert values(json.loads(capsys.readouterr().out))["trainable_params"] == HELLORA_PARAMS


def error_of(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    return captured.err


def test_unknown_shape_error(capsys):
    err = error_of(capsys, "--shape", "olmoe-9b")
    assert len(err.strip().splitlines()) == 1
    assert "Unknown model shape 'olmoe-9b'" in err and "olmoe-1b-7b" in err


def test_missing_config_error(tmp_path, capsys):
    err = error_of(capsys, "--config", str(tmp_path / "nowhere"))
    assert len(err.strip().splitlines()) == 1
    assert "does not exist" in err and "config.json" in err
    err = error_of(capsys, "--config", str(tmp_path))  # a directory without config.json
    assert "holds no config.json" in err


def test_rank_too_large_and_other_bad_input(capsys):
    err = error_of(capsys, "--shape", "olmoe-1b-7b", "--rank", "100")
    assert "router" in err and "--router-rank <= 64" in err and "--no-router" in err
    err = error_of(capsys, "--shape", "olmoe-1b-7b", "--rank", "4096", "--no-router")
    assert "--rank <= 2048" in err
    err = error_of(capsys, "--shape", "olmoe-1b-7b", "--method", "hellora", "--hot-k", "65")
    assert "--hot-k" in err
    err = error_of(capsys, "--shape", "olmoe-1b-7b", "--method", "nope")
    assert "invalid choice" in err
    err = error_of(capsys, "--shape", "olmoe-1b-7b", "--rank-m", "3")  # no prefix matching
    assert "unrecognized arguments" in err


def test_missing_profile_error(tmp_path, capsys):
    err = error_of(capsys, "--shape", "olmoe-1b-7b", "--method", "hellora", "--profile", str(tmp_path / "p.json"))
    assert "Routing profile" in err and "does not exist" in err


def hand_counts(sites, shares, top_k: int, density: float | None = None) -> tuple[int, float]:
    """Trainable parameters and forward adapter FLOPs per token written out over the sites' fields:
    LoRA r (out + in) parameters and 2 r (in + out) FLOPs per row, LoRI's B round(density r out),
    full deltas out in and 2 out in; routed experts at P(e) x top_k per token."""
    params, flops = 0, 0.0
    moe_rows = {}  # decoder layer -> row of `shares`
    for site in sites:
        out_features, in_features = site.shape
        ranks = site.ranks if site.kind == "routed_expert" else (site.rank,)
        for position, rank in enumerate(ranks):
            if site.form == "full":
                params += out_features * in_features
                cost = 2 * out_features * in_features
            elif site.form == "lori":
                params += round(density * rank * out_features)  # B only, mask in force
                cost = 2 * rank * (out_features + in_features)  # dense B
            else:
                params += rank * (out_features + in_features)
                cost = 2 * rank * (out_features + in_features)
            if site.kind == "routed_expert":
                row = moe_rows.setdefault(site.layer, len(moe_rows))
                flops += float(shares[row, site.experts[position]]) * top_k * cost
            else:
                flops += cost
    return params, flops


@pytest.mark.parametrize(
    "family,method", [("olmoe", "hellora"), ("mixtral", "lora"), ("qwen2_moe", "hellori"), ("olmoe", "esft")]
)
def test_budget_figures_are_sums_over_independently_built_sites(family, method):
    """budget() against adapter_sites of a plan built by build_plan directly, on a skewed routing."""
    from hellora_pl.adapters import LoRISpec, adapter_sites, build_plan
    from hellora_pl.backbones import BackboneConfig, architecture_for
    from hellora_pl.backbones.tiny import TINY_CONFIGS
    from hellora_pl.budget import budget
    from hellora_pl.loading import load_backbone
    from hellora_pl.routing import AllExperts, CoveragePerLayer, TopKPerLayer

    model_type, config = TINY_CONFIGS[family]
    model = load_backbone(BackboneConfig(model_type=model_type, config=dict(config)))
    arch = architecture_for(model)
    layers = [moe.index for moe in arch.moe_layers(model)]
    num_experts, top_k = arch.num_experts(model.config), arch.top_k(model.config)
    counts = torch.randint(1, 50, (len(layers), num_experts), generator=torch.Generator().manual_seed(1))
    profile = RoutingProfile(layers, counts, counts.double() / top_k, int(counts.sum()) // top_k, top_k)
    shares = counts.double() / counts.sum(dim=1, keepdim=True)

    rank, density = 4, 0.25
    lori = LoRISpec(density, "model", masked=True) if method == "hellori" else None
    full = method == "esft"
    policy = {"esft": CoveragePerLayer(coverage=0.2, by="count"), "lora": AllExperts()}.get(method, TopKPerLayer(k=2))
    plan = build_plan(
        model, policy, profile,
        rank=rank, alpha=rank, router_rank=None if full else rank, method=method, lori=lori,
        attention_modules=[] if full else None, shared_expert_modules=[] if full else None,
        expert_adapter="full" if full else "lora",
    )  # fmt: skip
    sites = adapter_sites(model, plan)
    assert {s.kind for s in sites} >= ({"routed_expert"} if full else {"attention", "router", "routed_expert"})
    params, flops = hand_counts(sites, shares, top_k, density)

    report = budget(model, method=method, rank=rank, hot_k=2, profile=profile, lori_density=density)
    figures = values(report)
    assert report["adapted_experts"]["total"] == sum(len(layer.hot_experts) for layer in plan.layers)
    assert figures["trainable_params"] == params
    assert figures["adapter_flops"] == round(flops)  # FLOP figures are rounded to whole FLOPs
    parts = ("adapter_flops_attention", "adapter_flops_router", "adapter_flops_shared_experts", "adapter_flops_experts")
    assert abs(sum(figures[p] for p in parts) - flops) <= 1  # each part rounded once
