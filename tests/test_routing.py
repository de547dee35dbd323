"""Routing profiles against a hand count, and the hot-expert selection policies."""

import pytest
import torch

from hellora_pl.routing import (
    AllExperts,
    CoveragePerLayer,
    FractionPerLayer,
    RoutingProfile,
    RoutingRecorder,
    TopKPerLayer,
)


def constructed_router_output(indices, weights, num_experts):
    logits = torch.zeros(indices.shape[0], num_experts)
    return lambda hidden_states: (logits, weights, indices)


def test_profile_counts_equal_hand_count_on_constructed_routing(model):
    # layer 0 routes four tokens; the last one is padding and must not count
    idx0 = torch.tensor([[0, 1], [0, 2], [7, 0], [5, 5]])
    w0 = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1], [0.5, 0.5]])
    idx1 = torch.tensor([[3, 4], [3, 4], [3, 6], [1, 1]])
    w1 = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.2, 0.8], [0.5, 0.5]])
    routers = [layer.mlp.gate for layer in model.model.layers]
    routers[0].forward = constructed_router_output(idx0, w0, 8)
    routers[1].forward = constructed_router_output(idx1, w1, 8)
    with RoutingRecorder(model) as recorder:
        recorder.armed = True
        recorder.set_token_mask(torch.tensor([[1, 1, 1, 0]]))
        hidden = torch.zeros(4, 32)
        routers[0](hidden)
        routers[1](hidden)
        recorder.armed = False
        routers[0](hidden)  # disarmed: not counted
        profile = recorder.profile()
    expected0 = torch.zeros(8, dtype=torch.long)
    for e in [0, 1, 0, 2, 7, 0]:
        expected0[e] += 1
    assert profile.counts[0].tolist() == expected0.tolist()
    assert profile.counts[1].tolist() == [0, 0, 0, 3, 2, 0, 1, 0]
    assert profile.gate_mass[0, 0].item() == pytest.approx(0.75 + 0.5 + 0.1)
    assert profile.gate_mass[1, 4].item() == pytest.approx(0.9)
    assert profile.tokens == 3
    assert profile.layers == [0, 1]
    # hooks are gone after the context
    assert all(len(r._forward_hooks) == 0 for r in routers)


def test_profile_on_real_model_counts_top_k_per_real_token(model, token_batch):
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.armed = True
        recorder.set_token_mask(token_batch["attention_mask"])
        model(**token_batch)
    profile = recorder.profile()
    real_tokens = int(token_batch["attention_mask"].sum())
    assert profile.tokens == real_tokens
    assert profile.counts.sum(dim=1).tolist() == [real_tokens * 2] * 2
    # OLMoE's tiny config renormalises nothing: gate mass is at most the token count
    assert (profile.gate_mass.sum(dim=1) <= real_tokens + 1e-6).all()


def profile_of(counts, top_k=2, gate_mass=None):
    counts = torch.tensor(counts, dtype=torch.long)
    gate_mass = counts.double() if gate_mass is None else torch.tensor(gate_mass, dtype=torch.float64)
    return RoutingProfile(list(range(counts.shape[0])), counts, gate_mass, int(counts.sum()), top_k)


def test_top_k_picks_most_selected_with_low_index_tie_break():
    profile = profile_of([[5, 9, 9, 1, 9, 0], [0, 0, 0, 0, 0, 0]])
    assert TopKPerLayer().select(profile) == [[1, 2], [0, 1]]
    assert TopKPerLayer(k=3).select(profile) == [[1, 2, 4], [0, 1, 2]]


def test_top_k_larger_than_experts_is_an_error():
    with pytest.raises(ValueError, match="k=7 is larger than the number of experts"):
        TopKPerLayer(k=7).select(profile_of([[1, 2, 3, 4, 5, 6]]))
    with pytest.raises(ValueError, match="k >= 1"):
        TopKPerLayer(k=0)


def test_fraction_rounds_up_and_keeps_at_least_one():
    profile = profile_of([[1, 8, 3, 2, 7, 0, 4, 5]])
    assert FractionPerLayer(0.25).select(profile) == [[1, 4]]
    assert FractionPerLayer(0.3).select(profile) == [[1, 4, 7]]
    assert FractionPerLayer(0.01).select(profile) == [[1]]


def test_coverage_takes_fewest_experts_reaching_share():
    profile = profile_of([[50, 30, 10, 10]], gate_mass=[[10.0, 10.0, 60.0, 20.0]])
    assert CoveragePerLayer(0.5).select(profile) == [[0]]
    assert CoveragePerLayer(0.8).select(profile) == [[0, 1]]
    assert CoveragePerLayer(0.81).select(profile) == [[0, 1, 2]]
    assert CoveragePerLayer(0.7, by="gate_mass").select(profile) == [[2, 3]]


def test_all_experts_is_every_expert_without_a_profile():
    assert AllExperts().select(profile_of([[0, 3, 1]])) == [[0, 1, 2]]
    assert AllExperts.needs_profile is False


def test_profile_round_trip(tmp_path):
    profile = profile_of([[1, 2], [3, 4]])
    profile.save(tmp_path / "p.json")
    again = RoutingProfile.read(tmp_path / "p.json")
    assert again.to_dict() == profile.to_dict()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RoutingProfile.read(tmp_path / "missing.json")


def test_heatmap_image_shape_and_brightness():
    from hellora_pl.routing.heatmap import heatmap_image

    image = heatmap_image(torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 0.0]]), cell=4)
    assert image.shape == (3, 8, 12) and image.dtype == torch.uint8
    brightness = image.float().sum(0)
    assert brightness[0, 8] > brightness[0, 4] > brightness[0, 0]  # row 0: 3 > 1 > 0
    assert brightness[4, 0] == brightness[4, 4] > brightness[4, 8]  # row 1: each row scaled to its max
