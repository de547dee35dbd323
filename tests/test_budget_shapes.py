"""Every built-in shape of a model hellora_pl supports gets a full budget: parameters, FLOPs and the
memory estimate with a 4-bit base (the shapes are built on the meta device, nothing is allocated)."""

import pytest

from hellora_pl.backbones.shapes import usable_shapes
from hellora_pl.budget import main


@pytest.mark.parametrize("shape", usable_shapes())
def test_every_usable_shape_gets_a_memory_budget(shape, capsys):
    report = main(["--shape", shape, "--method", "hellora", "--rank", "8", "--memory", "--quantization", "nf4",
                   "--batch-size", "1", "--seq-len", "256", "--gradient-checkpointing"])  # fmt: skip
    memory = dict(report["memory"]["figures"])
    weights, adapters, peak = (memory[key]["value"] for key in ("weights", "adapters", "total"))
    assert 0 < adapters < weights < peak, (weights, adapters, peak)


def test_the_shapes_of_todays_models_are_usable():
    assert {"gemma-4-26b-a4b", "gpt-oss-20b", "qwen3.6-35b-a3b", "glm-4.5-air", "deepseek-v3"} <= set(usable_shapes())
