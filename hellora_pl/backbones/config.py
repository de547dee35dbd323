"""Which backbone to fine-tune (`BackboneConfig`) and the dtypes a config may name.

Plain data, so every layer can name a backbone; `hellora_pl.loading.load_backbone` builds or
loads the model (and quantizes it), one layer above both `backbones` and `quant`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .shipped import resolve_shipped

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BackboneConfig:
    """Which model to fine-tune.

    Give `pretrained` (a hub id, a local directory, or a model hellora_pl ships such as
    ``hellora:mini-olmoe``) to load weights, or `model_type` plus
    `config` fields to build a randomly initialised model from a config (seeded, offline).
    With `pretrained`, `config` holds overrides applied to the loaded config. `quantization`
    ("nf4", "nf4-dq" or None) stores the frozen base in 4 bits (hellora_pl.quant, needs bitsandbytes);
    a pretrained model is quantized tensor by tensor as it loads, never held whole in 16 bits.
    """

    pretrained: str | None = None
    model_type: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    experts_implementation: str = "grouped_mm"
    attn_implementation: str = "sdpa"
    seed: int = 0
    trust_remote_code: bool = False
    revision: str | None = None
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.pretrained is not None:
            self.pretrained = resolve_shipped(self.pretrained)  # hellora:mini-olmoe -> its folder
