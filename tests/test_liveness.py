"""The liveness guard (hellora_pl/adapters/liveness.py): healthy models pass untouched, and a dead
expert adapter (Llama-4's eager experts), a post-expert norm the adapted path skips (one the experts
do not declare; a declared one runs), and a fit whose
experts path was reset stop with a message naming the site and the reason."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from test_sites import adapted
from torch import nn
from transformers import Llama4ForCausalLM, Llama4TextConfig
from transformers.integrations.moe import use_experts_implementation

from conftest import TINY_OLMOE, RandomTokens, make_trainer, tiny_olmoe
from hellora_pl import HotExpertInjectionCallback
from hellora_pl.adapters import adapter_state_dict, inject_adapters
from hellora_pl.adapters.liveness import DeadAdapterError, check_liveness
from hellora_pl.adapters.methods import resolve_method
from hellora_pl.adapters.plan import METHODS
from hellora_pl.backbones import BackboneConfig, MoEArchitecture
from hellora_pl.backbones.architecture import ROUTING_READERS
from hellora_pl.backbones.registry import ARCHITECTURES
from hellora_pl.module import HelloraModule


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
def test_a_healthy_model_passes_and_the_probe_changes_nothing(method):
    _, model, plan, sites, _, tokens = adapted("olmoe", method)
    model.train()
    before = snapshot(model)
    report = check_liveness(model, tokens)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before), "the probe must restore every tensor"
    assert all(p.grad is None for p in model.parameters()), "the probe leaves no gradient behind"
    assert model.training, "the probe restores the training mode"
    assert report.sites == len(sites) and report.backwards == 1
    if method != "attention_only":  # the adapted expert path was compared with the model's eager one
        assert report.base_difference is not None and report.base_difference <= report.tolerance


def test_the_probe_keeps_trained_adapters_and_existing_gradients():
    """Resuming: B is not zero and a gradient may be held; both come back exactly."""
    _, model, _, _, _, tokens = adapted("qwen2_moe", "hellora")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    held = next(p for p in model.parameters() if p.requires_grad)
    held.grad = torch.full_like(held, 3.0)
    before = snapshot(model)
    check_liveness(model, tokens)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert torch.equal(held.grad, torch.full_like(held, 3.0))


def test_a_lori_mask_that_keeps_nothing_of_a_matrix_is_not_a_dead_site():
    """LoRI's model-wide mask can keep no entry of a small matrix (a router's B, one expert's B): nothing
    there trains, by design, so the guard must not call it dead (a resumed hellori run was stopped so)."""
    _, model, plan, _, _, tokens = adapted("olmoe", "hellori")
    tensors = adapter_state_dict(model)
    router_mask = next(name for name in tensors if "gate" in name and name.endswith("lora_B_mask"))
    expert_mask = next(name for name in tensors if "experts" in name and "lora_B_mask" in name)
    with torch.no_grad():
        for name, tensor in tensors.items():
            if "lora_B_mask" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=torch.Generator().manual_seed(1)) < 0.3)
        tensors[router_mask].zero_()  # the router keeps nothing
        tensors[expert_mask][0].zero_()  # nor does the first hot expert of one projection
    plan.mark_lori_masked(switched_at_step=2)
    report = check_liveness(model, tokens)
    assert any(".gate." in path for path in report.masked_out), report.masked_out  # the router, reported


# -- Llama-4: its experts class has no experts-interface seam, so the expert adapters are dead ----------


def _read_llama4_router(output, top_k, config):
    scores, _ = output  # (sigmoid scores with -inf outside the top-k, logits)
    return torch.topk(scores, top_k, dim=-1)


LLAMA4 = {
    "name": "llama4_text",
    "model_types": ("llama4_text",),
    "moe_block": "feed_forward",
    "router": "router",
    "shared_experts": "shared_expert",
    "routing": "llama4_scores",
    "num_experts_field": "num_local_experts",
}


@pytest.fixture
def tiny_llama4(monkeypatch):
    """A 2-layer Llama-4 text model registered as a new user would (the issue's case)."""
    monkeypatch.setitem(ROUTING_READERS, "llama4_scores", _read_llama4_router)
    monkeypatch.setitem(ARCHITECTURES, "llama4_text", MoEArchitecture(**LLAMA4))
    config = Llama4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, intermediate_size_mlp=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
        interleave_moe_layer_step=1, no_rope_layers=[1, 1], max_position_embeddings=64, attention_chunk_size=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    return Llama4ForCausalLM(config)


def test_llama4_with_eager_experts_is_stopped_naming_the_experts_and_the_missing_seam(tiny_llama4):
    model = tiny_llama4
    plan = resolve_method("lora", rank=4, alpha=8.0).build(model, None)
    inject_adapters(model, plan, expert_kernel="torch")  # succeeds: the silent case
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(DeadAdapterError) as raised:
        check_liveness(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    message = str(raised.value)
    for layer in (0, 1):
        assert f"layer {layer} experts (model.layers.{layer}.feed_forward.experts.gate_up_proj)" in message
        assert f"layer {layer} experts (model.layers.{layer}.feed_forward.experts.down_proj)" in message
    assert "no gradient reached lora_A of expert" in message
    assert "lacks transformers' experts-interface seam" in message and "Llama4TextExperts" in message
    assert "attention" not in message.split("Likely")[0], "attention, router and shared expert adapters are live"
    assert "4 of" in message  # 2 layers x (gate_up_proj, down_proj); the other sites train


# -- a post-expert norm (transformers' has_post_expert_norm): the adapted path applies it -----------------


class ScaledRMSNorm(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 2.0, size))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


@use_experts_implementation(has_post_expert_norm=True)
class PostNormExperts(nn.Module):
    """OLMoE's experts with a norm after each expert, declared as transformers' MuseSpark experts do."""

    def __init__(self, config, source: nn.Module):
        super().__init__()
        self.num_experts = source.num_experts
        self.gate_up_proj = source.gate_up_proj
        self.down_proj = source.down_proj
        self.act_fn = source.act_fn
        self.post_expert_norm = ScaledRMSNorm(source.down_proj.shape[1])

    def forward(self, hidden_states, top_k_index, top_k_weights):  # MuseSparkExperts' eager forward
        out = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, position = torch.where(top_k_index == expert)
            if token.numel() == 0:
                continue
            gate, up = nn.functional.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            rows = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[expert])
            rows = self.post_expert_norm(rows) * top_k_weights[token, position, None]
            out.index_add_(0, token, rows.to(out.dtype))
        return out


def test_a_post_expert_norm_runs_in_the_adapted_path_and_the_probe_passes(token_batch):
    """The adapted path once skipped the norm and this probe stopped it; now it applies the norm
    (kernels/layout.py), so B = 0 matches the eager experts and every adapter is live."""
    model = tiny_olmoe()
    for layer in model.model.layers:
        layer.mlp.experts = PostNormExperts(model.config, layer.mlp.experts)
    plan = resolve_method("lora", rank=4, alpha=8.0).build(model, None)
    inject_adapters(model, plan, expert_kernel="torch")
    report = check_liveness(model, token_batch)
    assert report.base_difference is not None and report.base_difference <= report.tolerance


@use_experts_implementation()  # the norm is in its own forward, but not declared (has_post_expert_norm False)
class UndeclaredPostNormExperts(PostNormExperts):
    """A family whose eager forward applies a post-expert norm its interface flags do not declare: the
    adapted path (which follows the flags) skips it, as hellora_pl once did for declared ones."""


def test_a_post_expert_norm_the_adapted_path_skips_is_stopped(token_batch):
    model = tiny_olmoe()
    for layer in model.model.layers:
        layer.mlp.experts = UndeclaredPostNormExperts(model.config, layer.mlp.experts)
    assert not model.model.layers[0].mlp.experts.has_post_expert_norm
    plan = resolve_method("lora", rank=4, alpha=8.0).build(model, None)
    inject_adapters(model, plan, expert_kernel="torch")
    with pytest.raises(DeadAdapterError) as raised:
        check_liveness(model, token_batch)
    message = " ".join(str(raised.value).split())
    assert "with every adapter B (and delta) zeroed, the adapted model's logits differ from the model's own eager" in message
    assert "training would fit a different model" in message and "Nothing was trained" in message


# -- the fit: the guard runs on the first batch and stops before the optimizer's first step ----------


class ResetExpertsPath(Callback):
    """After injection, something sets the experts implementation back to transformers' own."""

    def setup(self, trainer, pl_module, stage):
        pl_module.model.set_experts_implementation("grouped_mm")


class CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1


def test_a_fit_with_a_dead_expert_path_stops_before_the_first_optimizer_step(tmp_path):
    module = HelloraModule(tiny_olmoe_config())
    injection = HotExpertInjectionCallback(method="lora", rank=4, expert_kernel="torch")
    steps = CountSteps()
    trainer = make_trainer(tmp_path, 2, [injection, ResetExpertsPath(), steps])
    with pytest.raises(DeadAdapterError, match=r"layer 0 experts .*'grouped_mm', not hellora's adapted path"):
        trainer.fit(module, datamodule=RandomTokens())
    assert steps.steps == 0


def test_a_healthy_fit_runs_the_guard_and_switching_it_off_warns(tmp_path):
    module = HelloraModule(tiny_olmoe_config())
    injection = HotExpertInjectionCallback(method="hellora", rank=4, expert_kernel="torch")
    steps = CountSteps()
    trainer = make_trainer(tmp_path, 1, [injection, steps])
    trainer.fit(module, datamodule=RandomTokens())
    assert steps.steps == 1 and not injection._liveness_pending
    with pytest.warns(UserWarning, match="liveness=false"):
        HotExpertInjectionCallback(method="hellora", liveness=False)


def tiny_olmoe_config():
    return BackboneConfig(model_type="olmoe", config=dict(TINY_OLMOE))


def test_a_router_whose_routing_gives_its_weight_no_gradient_is_reported_not_stopped():
    """PhiMoE's sparsemixer passes no gradient to the router weight when one expert survives its mask (here
    every token: a tiny jitter threshold). The router adapter is wired (the forward uses its weight): the
    guard lists it and does not stop the run (it stopped PhiMoE fits before)."""
    from transformers import AutoModelForCausalLM

    from hellora_pl.backbones.tiny import tiny_config_for

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config_for("phimoe", overrides={"router_jitter_noise": 1e-9}))
    plan = resolve_method("lora", rank=4, alpha=8.0).build(model, None)
    inject_adapters(model, plan, expert_kernel="torch")
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    report = check_liveness(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    routers = [f"model.layers.{i}.mlp.router.weight" for i in range(model.config.num_hidden_layers)]
    assert report.flat_routers == routers
    assert "no gradient on this batch" in report.summary()
