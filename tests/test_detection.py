"""Detection from the model (hellora_pl/backbones/detect.py): families whose experts use transformers'
experts interface in the plain layout need no description.

The matrix is found at test time by scanning the installed transformers for
`@use_experts_implementation` (new families join automatically): each decoder-only family is built
tiny from its config class (`tiny_config_for`), detected, profiled, adapted with `hellora` and
`lora`, and checked against an oracle computed here: the merged weights (W += scale * B @ A, on a
copy of the base, independently of hellora_pl's merge) run through transformers' own "eager"
experts. Families detection refuses are listed in REFUSED with the reason their message must name.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from conftest import tiny_olmoe
from hellora_pl.adapters import adapter_state_dict, inject_adapters
from hellora_pl.adapters.experts import expert_adapter
from hellora_pl.adapters.linear import LoRALinear
from hellora_pl.adapters.methods import resolve_method
from hellora_pl.adapters.router import RouterLoRA
from hellora_pl.backbones import UnsupportedArchitectureError, architecture_for
from hellora_pl.backbones.detect import DETECTED, detect_architecture, is_experts_interface
from hellora_pl.backbones.families import OLMOE
from hellora_pl.backbones.registry import ARCHITECTURES
from hellora_pl.backbones.tiny import tiny_config_for
from hellora_pl.routing import RoutingRecorder

ORACLE_TOLERANCE = 1e-5  # fp32: adapted path vs merged weights through transformers' eager experts
BASE_TOLERANCE = 1e-6  # fp32: B = 0 vs the base model's eager experts
RANK = 4

# model_type -> words its refusal must contain (the reason).
REFUSED = {
    "aria_text": "transposed expert weights",
    "gpt_oss": "interleaved gate/up",
    "jamba": "no self_attn (hybrid mixers",
    "lfm2_moe": "no self_attn (hybrid mixers",
    "qwen3_next": "no self_attn (hybrid mixers",
    "granitemoehybrid": "no self_attn (hybrid mixers",
    "nemotron_h": "ungated experts",
    "lara_mini": "no self_attn (hybrid mixers",
    "qwen3_5_moe_text": "no self_attn (hybrid mixers",
    "inkling_text": "has no child with an [8, 32] router weight",
    "minimax": "lack the first layer's projections",  # linear attention under self_attn
}

# Families the tiny config maker does not yet turn into a working tiny model (left for the next
# session; each reason as seen): not in the matrix, and listed in the report, not skipped silently.
TINY_GAPS = {
    "bailing_hybrid": "tiny model fails in its own forward (selected index k out of range)",
    "deepseek_v4": "hc attention: LoRA shapes differ from the projection's (1024 vs 8192)",
    "flint": "defaults leave every tiny layer dense (no MoE layer)",
    "gemma4_text": "enable_moe_block defaults to False (no MoE layer)",
    "hunyuan_v1_moe": "head_dim default None",
    "kimi_linear": "linear-attention cache in a tiny 2-layer model",
    "qwen4_exp_text": "config validators (indexer sizes default None)",
    "zaya": "validator: num_experts_per_tok must be 1",
    "granitemoehybrid": "validator: mamba_n_heads must divide mamba_expand * hidden_size",
    "lfm2_moe": "layer_types defaults to None",
}


@functools.cache
def experts_interface_causal_lms() -> tuple[str, ...]:
    """Causal-LM model types of the installed transformers whose modeling uses `@use_experts_implementation`."""
    models = Path(transformers.__file__).parent / "models"
    folders = {p.parent.name for p in models.glob("*/modeling_*.py") if "@use_experts_implementation" in p.read_text()}
    # model_type_to_module_name names a type's folder without importing it (importing all ~400 is slow).
    return tuple(sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if model_type_to_module_name(t) in folders))


def is_multimodal(model_type: str) -> bool:
    """A wrapper with a text_config (its MoE text decoder is its own `*_text` type); not in this matrix."""
    return "text_config" in (getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {})


DECODERS = [t for t in experts_interface_causal_lms() if not is_multimodal(t)]
DETECTED_FAMILIES = [t for t in DECODERS if t not in REFUSED and t not in ARCHITECTURES and t not in TINY_GAPS]
REFUSED_FAMILIES = [t for t in DECODERS if t in REFUSED and t not in TINY_GAPS]


def tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config_for(model_type), dtype=torch.float32)
    return model.eval()


def token_batch(config, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def merged_copy(base, adapted):
    """The base with every adapter folded in, computed here (not by hellora_pl's merge)."""
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, module in adapted.named_modules():
            if isinstance(module, LoRALinear):
                modules[name].weight += module.scale * module.lora_B @ module.lora_A
            elif isinstance(module, RouterLoRA):  # <router>.parametrizations.weight.0
                router = name.rsplit(".parametrizations", 1)[0]
                modules[router].weight += module.scale * module.lora_B @ module.lora_A
            elif is_experts_interface(module) and expert_adapter(module) is not None:
                lora = expert_adapter(module)
                for slot, expert in enumerate(lora.hot_experts.tolist()):
                    for projection in lora.projections:
                        delta = lora.scale * lora.lora_B[projection][slot] @ lora.lora_A[projection][slot]
                        getattr(modules[name], projection)[expert] += delta
    merged.set_experts_implementation("eager")
    return merged


@pytest.mark.parametrize("model_type", DETECTED_FAMILIES)
def test_a_detected_family_profiles_adapts_and_matches_the_merged_oracle(model_type):
    base = tiny_model(model_type)
    arch = architecture_for(base)
    assert arch.notes == DETECTED and arch.reads_experts_input and arch.name == model_type
    tokens = token_batch(base.config)
    moe_layers = arch.moe_layers(base)
    assert moe_layers, "a detected family has MoE layers"

    with RoutingRecorder(base) as recorder, torch.no_grad():
        recorder.armed = True
        base(**tokens)
    profile = recorder.profile()
    assert profile.tokens == tokens["input_ids"].numel()
    assert profile.counts.sum(dim=1).tolist() == [profile.tokens * arch.top_k(base.config)] * len(moe_layers)

    base_eager = copy.deepcopy(base)
    base_eager.set_experts_implementation("eager")
    with torch.no_grad():
        base_logits = base_eager(**tokens).logits
    for method in ("hellora", "lora"):
        model = copy.deepcopy(base)
        plan = resolve_method(method, rank=RANK, alpha=8.0).build(model, profile)
        inject_adapters(model, plan, expert_kernel="torch")
        with torch.no_grad():
            zero_b = model(**tokens).logits
        scale = max(1.0, float(base_logits.abs().max()))
        assert (zero_b - base_logits).abs().max() <= BASE_TOLERANCE * scale, f"{method}: B = 0 differs from the base"

        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, tensor in adapter_state_dict(model).items():
                if "lora_B" in name:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        with torch.no_grad():
            adapted_logits = model(**tokens).logits
            oracle_logits = merged_copy(base, model)(**tokens).logits
        assert not torch.allclose(adapted_logits, base_logits, atol=1e-3), f"{method}: the adapters change nothing"
        difference = float((adapted_logits - oracle_logits).abs().max())
        assert difference <= ORACLE_TOLERANCE * scale, f"{method}: adapted vs merged oracle differ by {difference}"

    # Two training steps (the last model, lora) change adapter tensors only.
    model.train()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(2):
        loss = model(**tokens, labels=tokens["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, t in model.state_dict().items() if not torch.equal(before[name], t)}
    assert changed, "training changed nothing"
    assert all("lora_" in name for name in changed), (
        f"non-adapter tensors changed: {sorted(changed - {n for n in changed if 'lora_' in n})}"
    )


@pytest.mark.parametrize("model_type", REFUSED_FAMILIES)
def test_a_refused_family_is_named_with_its_reason(model_type):
    model = tiny_model(model_type)
    with pytest.raises(UnsupportedArchitectureError) as refused:
        architecture_for(model)
    flat = " ".join(str(refused.value).split())
    assert f"Unknown model_type {model_type!r}" in flat
    assert REFUSED[model_type] in flat
    assert "hellora_pl.backbones.MoEArchitecture(...)" in flat  # the fix


def test_the_matrix_covers_the_surveyed_families():
    """The scan finds the families (so a broken scan cannot pass with an empty matrix)."""
    assert len(DETECTED_FAMILIES) >= 20 and {"olmoe", "deepseek_v3", "gpt_oss"} <= set(experts_interface_causal_lms())


def test_detection_reads_the_registered_families_paths():
    """On olmoe, detection finds what the hand-written description says."""
    model = tiny_olmoe()
    found = detect_architecture(model)
    for field in ("layers", "attention", "moe_block", "router", "experts", "shared_experts", "num_experts_field",
                  "top_k_field", "aux_loss_field"):  # fmt: skip
        assert getattr(found, field) == getattr(OLMOE, field), field
    assert set(found.attention_projections) == set(OLMOE.attention_projections)


def test_a_model_without_experts_interface_is_not_detected():
    from transformers import LlamaConfig

    model = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    assert detect_architecture(model) is None
    with pytest.raises(UnsupportedArchitectureError, match="Unknown model_type 'llama'"):
        architecture_for(model)


def test_router_output_and_experts_input_give_identical_profiles(monkeypatch):
    """olmoe read at the router's output (its registered reader) and at the experts' input: same counts and mass."""
    model = tiny_olmoe().eval()
    tokens = token_batch(model.config, batch=3, length=10)
    tokens["attention_mask"][0, :3] = 0  # padding is left out the same way

    def profile():
        with RoutingRecorder(model) as recorder, torch.no_grad():
            recorder.arm(tokens)
            model(**tokens)
        return recorder.profile()

    at_router = profile()
    monkeypatch.setitem(ARCHITECTURES, "olmoe", dataclasses.replace(OLMOE, routing="experts_input"))
    at_experts = profile()
    assert at_router.tokens == at_experts.tokens == int(tokens["attention_mask"].sum())
    assert torch.equal(at_router.counts, at_experts.counts)
    assert torch.allclose(at_router.gate_mass, at_experts.gate_mass, rtol=0, atol=1e-12)
