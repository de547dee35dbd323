"""NF4 on detected families with parts at unusual places: a router at a dotted path in the block
(gemma4: `router.proj`, the block being the decoder layer), hybrid mixers (each layer type's own
projections), ungated experts (nemotron_h). The oracle is the dense model holding exactly the
values the NF4 storage decodes to."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("bitsandbytes")

from hellora_pl.backbones.tiny import tiny_config_for  # noqa: E402
from hellora_pl.quant import quantize_model  # noqa: E402
from hellora_pl.quant.model import quantization_targets  # noqa: E402
from test_quant_transposed import nf4_of  # noqa: E402

ATOL, RTOL = 1e-5, 1e-5  # the same fp32 weights on both sides; only summation order may differ


@pytest.mark.parametrize("model_type", ["gemma4_text", "qwen3_5_moe_text", "nemotron_h"])
def test_nf4_quantizes_each_part_where_the_family_keeps_it(model_type):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config_for(model_type), dtype=torch.float32).eval()
    reference = copy.deepcopy(model)
    targets, reference_targets = quantization_targets(model), quantization_targets(reference)
    roles = {t.role for t in targets}
    assert {"router", "experts", "attention"} <= roles, roles
    quantize_model(model, "nf4")
    with torch.no_grad():
        for target, ref in zip(targets, reference_targets, strict=True):
            dense = getattr(ref.owner, ref.attr).weight if ref.kind == "linear" else getattr(ref.owner, ref.attr)
            dense.copy_(ref.logical(nf4_of(target).dequantize()))
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=ATOL, rtol=RTOL)
