"""The tiny configs of the model types whose tiny model did not build (hellora_pl/backbones/tiny.py overrides):
each builds small and runs a text-only forward, so the support matrix checks or refuses it by name; a model
without a forward (generate only) is refused by name before it is built."""

from __future__ import annotations

import sys

import pytest
import torch

from hellora_pl.backbones.tiny import tiny_wrapper_config
from hellora_pl.support.matrix import build_tiny, token_batch

MAX_PARAMETERS = 3_000_000  # every tower tiny: nemotron_h_omni's projector alone was 21M at its default widths

# model type -> kind; each raised before its override (a validator, a missing field, a shape mismatch, scipy)
BUILT_BY_AN_OVERRIDE = {
    "longcat_flash": "decoder",  # its size fields have their own names: 1050M parameters
    "mistral4": "decoder",  # head_dim != qk_nope + qk_rope: RoPE shape mismatch in the forward
    "nemo_speechlm": "multimodal",  # diarization head width, word-timestamp blank id: validators
    "nemotron_h_omni": "multimodal",  # vision video_temporal_patch_size: validator; projector 21M
    "step3p7": "multimodal",  # sliding_window None: its sliding mask cannot be built
    "inkling_mm_model": "multimodal",  # a 1-layer vision encoder plans its scales with scipy
}


@pytest.mark.parametrize("model_type", sorted(BUILT_BY_AN_OVERRIDE))
def test_the_tiny_model_builds_small_and_runs_text_only(model_type, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # not a dependency: the real models never need it either
    model = build_tiny(model_type, BUILT_BY_AN_OVERRIDE[model_type])
    assert sum(p.numel() for p in model.parameters()) <= MAX_PARAMETERS
    batch = token_batch(model.config)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_a_wrappers_own_fields_are_overridden_beside_its_sub_configs():
    config = tiny_wrapper_config("nemotron_h_omni")
    assert config.vision_hidden_size == config.vision_config.hidden_size == 32
    assert config.projector_hidden_size == 32


def test_a_generate_only_model_is_refused_by_name_before_it_is_built():
    with pytest.raises(ValueError, match="Qwen3OmniMoeForConditionalGeneration has no forward"):
        build_tiny("qwen3_omni_moe", "decoder")
