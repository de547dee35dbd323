"""The adapted expert path against a naive oracle that builds W + BA per expert."""

import pytest
import torch

from conftest import TINY_OLMOE, naive_experts_forward, tiny_olmoe
from hellora_pl.adapters import AdapterPlan, ExpertDelta, ExpertLoRA, LayerPlan, adapter_state_dict, inject_adapters
from hellora_pl.adapters.experts import EXPERT_ADAPTER_ATTR
from hellora_pl.backbones import BackboneConfig
from hellora_pl.kernels import DELTA, LORA, adapted_experts_forward
from hellora_pl.loading import load_backbone


def experts_with_lora(hot, num_tokens=23, top_k=2, seed=0, rank=4, active_ranks=None, lori=False, **config):
    torch.manual_seed(seed)
    model = tiny_olmoe(**config)
    experts = model.model.layers[0].mlp.experts
    experts.requires_grad_(False)
    shapes = {name: tuple(getattr(experts, name).shape[1:]) for name in ("gate_up_proj", "down_proj")}
    lora = ExpertLoRA(shapes, experts.gate_up_proj.shape[0], hot, rank, 2.0, active_ranks=active_ranks, lori=lori)
    with torch.no_grad():
        for name in lora.projections:
            lora.lora_B[name].normal_(0, 0.5)
            if lori:
                lora.lora_B_mask[name].copy_(torch.rand(lora.lora_B[name].shape) < 0.3)
    setattr(experts, EXPERT_ADAPTER_ATTR, lora)
    num_experts = experts.gate_up_proj.shape[0]
    hidden = torch.randn(num_tokens, experts.gate_up_proj.shape[2])
    scores = torch.randn(num_tokens, num_experts)
    weights, index = torch.topk(scores.softmax(-1), top_k, dim=-1)
    return experts, lora, hidden, index, weights


@pytest.mark.parametrize(
    "hot,top_k",
    [([0, 3], 2), ([5], 1), (list(range(8)), 2), ([1, 2, 7], 8), ([6], 3)],
)
def test_forward_and_grads_match_naive_loop(hot, top_k):
    experts, lora, hidden, index, weights = experts_with_lora(hot, top_k=top_k)
    hidden.requires_grad_(True)
    ours = adapted_experts_forward(experts, hidden, index, weights)
    grad_out = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, [hidden, *lora.parameters()], grad_out)

    reference = naive_experts_forward(experts, hidden, index, weights)
    ref_grads = torch.autograd.grad(reference, [hidden, *lora.parameters()], grad_out)

    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip(ours_grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def position(tensors, wanted):
    return next(i for i, t in enumerate(tensors) if t is wanted)


@pytest.mark.parametrize(
    "rank,active_ranks,lori",
    [(3, None, False), (6, None, False), (6, [1, 6, 3], False), (5, None, True)],
    ids=["odd-rank", "unaligned-rank", "dr-lora-active-ranks", "lori-mask"],
)
def test_ranks_and_masks_match_naive_loop(rank, active_ranks, lori):
    experts, lora, hidden, index, weights = experts_with_lora(
        [1, 2, 7], top_k=2, rank=rank, active_ranks=active_ranks, lori=lori
    )
    hidden.requires_grad_(True)
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert len(trainable) == (2 if lori else 4)  # LoRI: A frozen
    ours = adapted_experts_forward(experts, hidden, index, weights)
    grad_out = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, [hidden, *trainable], grad_out)
    reference = naive_experts_forward(experts, hidden, index, weights)
    ref_grads = torch.autograd.grad(reference, [hidden, *trainable], grad_out)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    for got, want in zip(ours_grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if active_ranks is not None:  # slices beyond an expert's active rank get no gradient
        grad_b = ours_grads[1 + position(trainable, lora.lora_B["down_proj"])]
        for slot, active in enumerate(active_ranks):
            assert torch.count_nonzero(grad_b[slot, :, active:]) == 0
    if lori:
        grad_b = ours_grads[1 + position(trainable, lora.lora_B["gate_up_proj"])]
        assert torch.count_nonzero(grad_b[~lora.lora_B_mask["gate_up_proj"]]) == 0


def test_cold_tokens_equal_base_and_hot_tokens_change():
    experts, lora, hidden, index, weights = experts_with_lora([0, 3], num_tokens=64)
    adapted = adapted_experts_forward(experts, hidden, index, weights)
    delattr(experts, "hellora_lora")
    base = adapted_experts_forward(experts, hidden, index, weights)
    touches_hot = (index.unsqueeze(-1) == torch.tensor([0, 3])).any(-1).any(-1)
    assert touches_hot.any() and (~touches_hot).any()
    # Exactly: the same base computation on the same rows in this process; the adapter never touches them.
    torch.testing.assert_close(adapted[~touches_hot], base[~touches_hot], atol=0, rtol=0)
    assert (adapted[touches_hot] - base[touches_hot]).abs().amax(-1).min() > 1e-4


def test_hot_expert_without_tokens_gets_no_update_and_no_error():
    experts, lora, hidden, _, _ = experts_with_lora([4, 6], num_tokens=10)
    index = torch.zeros(10, 2, dtype=torch.long)
    index[:, 1] = 6  # expert 4 is hot but receives nothing
    weights = torch.full((10, 2), 0.5)
    out = adapted_experts_forward(experts, hidden, index, weights)
    out.sum().backward()
    assert lora.lora_A["gate_up_proj"].grad[0].abs().sum() == 0  # slot 0 = expert 4
    assert lora.lora_A["gate_up_proj"].grad[1].abs().sum() > 0


def test_base_path_matches_transformers_grouped_mm(token_batch):
    model = tiny_olmoe()
    with torch.no_grad():
        reference = model(**token_batch).logits
        model.set_experts_implementation("hellora")
        ours = model(**token_batch).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def full_plan(model, hot):
    return AdapterPlan(
        method="hellora",
        architecture="olmoe",
        num_experts=8,
        top_k=2,
        policy={"name": "test"},
        rank=4,
        alpha=8,
        router_rank=4,
        attention_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        expert_modules=["gate_up_proj", "down_proj"],
        layers=[LayerPlan(0, hot[0]), LayerPlan(1, hot[1])],
    )


def test_zero_B_leaves_model_output_unchanged(model, token_batch):
    with torch.no_grad():
        before = model(**token_batch).logits
    inject_adapters(model, full_plan(model, [[1, 2], [0, 7]]))
    with torch.no_grad():
        after = model(**token_batch).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_only_adapter_tensors_get_gradients(model, token_batch):
    inject_adapters(model, full_plan(model, [[1, 2], [0, 7]]))
    with torch.no_grad():
        for name, tensor in adapter_state_dict(model).items():
            if "lora_B" in name:
                tensor.normal_(0, 0.1)
    labels = token_batch["input_ids"].clone()
    model(**token_batch, labels=labels).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= set(adapter_state_dict(model))
    # every adapter that saw tokens gets a gradient: attention, routers and hot experts
    assert any("q_proj.lora_A" in n for n in with_grad)
    assert any("gate.parametrizations.weight.0.lora_A" in n for n in with_grad)
    assert any("experts.hellora_lora.lora_A.down_proj" in n for n in with_grad)
    frozen = [p for n, p in model.named_parameters() if n not in adapter_state_dict(model)]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


def test_bfloat16_base_keeps_float32_adapters_that_train(token_batch):
    model = load_backbone(BackboneConfig(model_type="olmoe", config=TINY_OLMOE, dtype="bfloat16"))
    plan = full_plan(model, [[1, 2], [0, 7]])
    inject_adapters(model, plan)
    adapters = adapter_state_dict(model)
    assert {t.dtype for t in adapters.values()} == {torch.float32}
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    with torch.no_grad():
        for name, tensor in adapters.items():
            if "lora_B" in name:
                tensor.normal_(0, 0.1)
    model(**token_batch, labels=token_batch["input_ids"]).loss.backward()
    grads = [t.grad for t in adapters.values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


class _DuckDelta:
    """Meets kernels.contract.DeltaExperts without being an adapters class: the path must read `kind`."""

    kind = DELTA

    def __init__(self, num_experts, hot, deltas):
        self.hot_experts = torch.tensor(hot)
        self.slot_of_expert = torch.full((num_experts,), -1, dtype=torch.long)
        self.slot_of_expert[self.hot_experts] = torch.arange(len(hot))
        self.deltas = deltas

    @property
    def num_hot(self):
        return int(self.hot_experts.numel())

    @property
    def projections(self):
        return list(self.deltas)

    def delta_weight(self, name):
        return self.deltas[name]


def test_the_expert_path_reads_the_contract_not_the_adapter_classes():
    assert (ExpertLoRA.kind, ExpertDelta.kind) == (LORA, DELTA)
    experts, _, hidden, index, weights = experts_with_lora([0, 3])
    delattr(experts, EXPERT_ADAPTER_ATTR)
    hot, experts_projections = [1, 3, 6], ("gate_up_proj", "down_proj")
    deltas = {name: 0.1 * torch.randn(len(hot), *getattr(experts, name).shape[1:]) for name in experts_projections}
    setattr(experts, EXPERT_ADAPTER_ATTR, _DuckDelta(8, hot, deltas))
    ours = adapted_experts_forward(experts, hidden, index, weights)
    delattr(experts, EXPERT_ADAPTER_ATTR)
    with torch.no_grad():  # the same update folded into the base: no adapter left
        for name, delta in deltas.items():
            getattr(experts, name)[hot] += delta
    merged = adapted_experts_forward(experts, hidden, index, weights)
    assert (ours - naive_experts_forward(experts, hidden, index, weights)).abs().max() < 1e-5
    torch.testing.assert_close(ours, merged, atol=1e-5, rtol=1e-5)
