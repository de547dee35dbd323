"""The control hot-expert policies (random experts, least-used experts): selection, settings refused,
plans that round-trip through their description, and the command line naming them."""

import pytest
import torch

from conftest import REPO
from hellora_pl.adapters.methods import resolve_method
from hellora_pl.cli import main
from hellora_pl.routing import (
    LeastUsedExperts,
    RandomExperts,
    RoutingProfile,
    TopKPerLayer,
    policy_from_description,
)


def profile_of(counts, top_k=2, layers=None):
    counts = torch.tensor(counts, dtype=torch.long)
    layers = list(range(counts.shape[0])) if layers is None else layers
    return RoutingProfile(layers, counts, counts.double(), int(counts.sum()) // top_k, top_k)


def test_least_used_takes_the_k_least_selected_with_low_index_tie_break():
    profile = profile_of([[9, 0, 5, 0, 3, 7], [1, 1, 8, 2, 1, 6]])
    assert LeastUsedExperts().select(profile) == [[1, 3], [0, 1]]  # k = top-k = 2; ties to the lower index
    assert LeastUsedExperts(k=3).select(profile) == [[1, 3, 4], [0, 1, 4]]
    top = TopKPerLayer(k=3).select(profile)
    assert all(not set(a) & set(b) for a, b in zip(LeastUsedExperts(k=3).select(profile), top))


def test_random_draws_k_distinct_experts_per_layer_fixed_by_seed_and_layer():
    counts = [[100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]] * 4
    profile = profile_of(counts, top_k=4)
    first = RandomExperts(seed=7).select(profile)
    assert first == RandomExperts(seed=7).select(profile)  # same seed: same draw
    assert all(len(layer) == 4 == len(set(layer)) and layer == sorted(layer) for layer in first)
    assert all(0 <= e < 16 for layer in first for e in layer)
    assert len({tuple(layer) for layer in first}) > 1  # each layer draws on its own
    others = [RandomExperts(seed=s).select(profile) for s in range(8)]
    assert len({str(o) for o in others}) == 8  # seeds give different draws
    # The counts play no part, only the layer's index: a different profile of the same layers, same draw.
    shuffled = profile_of([[0] * 15 + [100]] * 4, top_k=4)
    assert RandomExperts(seed=7).select(shuffled) == first
    # A layer's draw depends on its index in the model, not on its position in the profile.
    later = profile_of(counts[:2], top_k=4, layers=[2, 3])
    assert RandomExperts(seed=7).select(later) == first[2:]
    assert RandomExperts(k=6, seed=7).select(profile)[0] != first[0]


def test_random_choice_is_roughly_uniform_over_experts():
    profile = profile_of([[1] * 8] * 400, top_k=2)
    hits = torch.zeros(8)
    for layer in RandomExperts(seed=1).select(profile):
        hits[layer] += 1
    expected = 400 * 2 / 8  # 100 per expert; binomial sd ~8.7
    assert float((hits - expected).abs().max()) < 5 * 8.7


@pytest.mark.parametrize("policy", [RandomExperts, LeastUsedExperts])
def test_bad_settings_are_refused_naming_the_fix(policy):
    with pytest.raises(ValueError, match="k >= 1"):
        policy(k=0)
    with pytest.raises(ValueError, match="choose k <= 4"):
        policy(k=5).check(num_experts=4, top_k=2)
    policy(k=None).check(num_experts=4, top_k=2)  # k = top-k fits
    with pytest.raises(ValueError, match="choose k <= 4"):
        policy().check(num_experts=4, top_k=8)
    with pytest.raises(ValueError, match="choose k <= 4"):
        policy(k=5).select(profile_of([[1, 2, 3, 4]]))


def test_random_refuses_a_negative_seed():
    with pytest.raises(ValueError, match="seed >= 0"):
        RandomExperts(seed=-1)


@pytest.mark.parametrize(
    "policy", [RandomExperts(k=3, seed=11), RandomExperts(), LeastUsedExperts(k=2), LeastUsedExperts()]
)
def test_description_round_trips(policy):
    description = policy.describe()
    rebuilt = policy_from_description(description)
    assert type(rebuilt) is type(policy) and rebuilt.describe() == description
    profile = profile_of([[5, 1, 0, 7, 2, 2, 9, 3]] * 3)
    assert rebuilt.select(profile) == policy.select(profile)


def test_random_seed_is_in_the_description():
    assert RandomExperts(k=4, seed=3).describe() == {"name": "random", "k": 4, "seed": 3}
    assert LeastUsedExperts(k=4).describe() == {"name": "least_used", "k": 4}


def test_controls_place_adapters_through_the_plan(model, token_batch):
    """On a real model's plan: the hot sets are the policies' choice, the plan records the policy, and the
    random control trains exactly as many parameters as HELLoRA at the same k."""
    from hellora_pl.routing import RoutingRecorder

    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.armed = True
        recorder.set_token_mask(token_batch["attention_mask"])
        model(**token_batch)
    profile = recorder.profile()
    plans = {}
    for name, policy in (("top", TopKPerLayer()), ("random", RandomExperts(seed=5)), ("least", LeastUsedExperts())):
        settings = resolve_method("hellora", rank=4, alpha=8.0, hot_experts=policy)
        plans[name] = settings.build(model, profile)
        assert [layer.hot_experts for layer in plans[name].layers] == policy.select(profile)
        assert plans[name].policy == policy.describe()
    assert plans["random"].trainable_params == plans["top"].trainable_params == plans["least"].trainable_params
    for top, least, counts in zip(plans["top"].layers, plans["least"].layers, profile.counts):
        assert int(counts[top.hot_experts].sum()) >= int(counts[least.hot_experts].sum())


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["RandomExperts", "--hellora.hot_experts.seed", "3"], {"k": None, "seed": 3}),
        (["LeastUsedExperts", "--hellora.hot_experts.k", "3"], {"k": 3}),
    ],
)
def test_command_line_takes_the_controls_by_class_name(flags, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "quickstart.yaml"),
                "--hellora.hot_experts",
                *flags,
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)["hellora"]["hot_experts"]
    assert printed["class_path"].split(".")[-1] == flags[0]
    assert printed["init_args"] == expected
