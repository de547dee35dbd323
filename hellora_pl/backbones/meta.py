"""The architecture of a config, found before any weight exists: the model is built on the meta device.

A registered family is known by its `model_type`; any other one is detected from the built model
(`detect.detect_architecture`), so every path that starts from a config (loading, the CLI, the
budget tool, the built-in shapes) builds it on meta once and asks `architecture_for` the model.
Shapes only: no memory, no weights, well under a second even for a 600B-parameter config.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .architecture import MoEArchitecture
from .registry import ARCHITECTURES, UnsupportedArchitectureError, architecture_for, unsupported_model_type_message


def meta_model(config: PretrainedConfig, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """Build the causal-LM model for `config` on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def meta_architecture(
    config: PretrainedConfig, source: str | None = None, *, trust_remote_code: bool = False
) -> MoEArchitecture:
    """The description of a model of `config`: the registered one, else the one detected from the
    model built on meta. Refuses (UnsupportedArchitectureError, the one unknown-model message, with
    detection's reason and `source`) a model that is not understood, before anything is allocated."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    try:
        model = meta_model(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
        why = " ".join(str(exc).split())[:300]
        reason = f"transformers cannot build it as a causal LM ({type(exc).__name__}: {why})"
        raise UnsupportedArchitectureError(
            unsupported_model_type_message(model_type, source, detection=reason), reason
        ) from None
    return architecture_for(model, source)


__all__ = ["meta_architecture", "meta_model"]
