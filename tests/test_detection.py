"""Detection from the model (hellora_pl/backbones/detect.py): families whose experts use transformers'
experts interface need no description.

Every MoE family of the installed transformers is built tiny and checked end to end against the
merged oracle by the support matrix (hellora_pl/support, tests/test_support_matrix.py). Here: each
refusal names its reason (REFUSED pins the words), and detection reads what the hand-written
descriptions say, down to the routing profile.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_olmoe
from hellora_pl.backbones import UnsupportedArchitectureError, architecture_for
from hellora_pl.backbones.detect import detect_architecture
from hellora_pl.backbones.families import OLMOE
from hellora_pl.backbones.registry import ARCHITECTURES
from hellora_pl.routing import RoutingRecorder
from hellora_pl.support.matrix import build_tiny, is_wrapper, moe_families, token_batch

_NOT_THE_INTERFACE = "do not use transformers' experts interface (@use_experts_implementation)"

# model_type -> words its refusal must contain (the reason); the matrix must agree (test below).
REFUSED = {
    # a block-diffusion model (DiffusionGemmaForBlockDiffusion), its decoder not at a causal LM's path
    "diffusion_gemma": "its decoder layers are at none of model.layers, model.language_model.layers",
    # modality-split experts: text tokens and image tokens go to different expert sets in each layer
    "ernie4_5_vl_moe": "hold experts at different paths (mlp.text_moe.experts, mlp.vision_moe.experts)",
    # the router reads hidden_size (32) while the experts run at moe_hidden_size (16) after pre_expert_proj
    "muse_spark": "(MuseSparkMoE) has no child with an [8, 16] router weight",
    # MoE families whose experts run outside the experts interface (expert adapters would never run)
    "doge": f"its experts {_NOT_THE_INTERFACE}",
    "jetmoe": f"its experts (JetMoeParallelExperts) {_NOT_THE_INTERFACE}",
    "llama4": f"its experts (Llama4TextExperts) {_NOT_THE_INTERFACE}",
    "llama4_text": f"its experts (Llama4TextExperts) {_NOT_THE_INTERFACE}",
    "longcat_flash": f"its experts (LongcatFlashExperts) {_NOT_THE_INTERFACE}",
    "step3p7": f"its experts (Step3p7Experts) {_NOT_THE_INTERFACE}",
}
FAMILIES = {model_type: (family, kind) for family, model_type, kind in moe_families()}


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_a_refused_family_is_named_with_its_reason(model_type):
    model = build_tiny(model_type, FAMILIES[model_type][1])
    with pytest.raises(UnsupportedArchitectureError) as refused:
        architecture_for(model)
    flat = " ".join(str(refused.value).split())
    assert f"Unknown model_type {model_type!r}" in flat or f"Unknown model_type {model.config.model_type!r}" in flat
    assert REFUSED[model_type] in flat
    assert "hellora_pl.backbones.MoEArchitecture(" in flat  # the fix


def test_the_scan_finds_the_families_and_the_refusals_are_among_them():
    """The scan is not empty or partial (a broken scan cannot pass with a small matrix)."""
    assert len(FAMILIES) >= 80 and {"olmoe", "deepseek_v3", "gpt_oss", "qwen3_vl_moe", "gemma4"} <= set(FAMILIES)
    assert set(REFUSED) <= set(FAMILIES)
    assert is_wrapper("qwen3_vl_moe") and not is_wrapper("qwen3_moe")


def test_a_registered_family_keeps_its_description():
    model = build_tiny("olmoe", "decoder")
    assert architecture_for(model) is ARCHITECTURES["olmoe"]


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

