import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hellora_pl.backbones import BackboneConfig, load_backbone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TINY_OLMOE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,
)


def tiny_olmoe(seed: int = 0, **overrides):
    return load_backbone(BackboneConfig(model_type="olmoe", config={**TINY_OLMOE, **overrides}, seed=seed))


@pytest.fixture
def model():
    return tiny_olmoe()


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, TINY_OLMOE["vocab_size"], (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}
