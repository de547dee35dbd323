"""The supported architectures, looked up by `config.model_type`."""

from __future__ import annotations

import weakref

from torch import nn

from .architecture import MoEArchitecture
from .detect import DetectionRefused, detect_architecture

ARCHITECTURES: dict[str, MoEArchitecture] = {}


class UnsupportedArchitectureError(ValueError):
    """No description of a model type; `detection` is why detecting it from the model failed, if it was tried."""

    def __init__(self, message: str, detection: str | None = None):
        super().__init__(message)
        self.detection = detection


def register_architecture(arch: MoEArchitecture) -> MoEArchitecture:
    """Make `arch` known for each of its `model_types` (replacing an earlier description)."""
    for model_type in arch.model_types:
        ARCHITECTURES[model_type] = arch
    return arch


def supported_model_types() -> list[str]:
    """The explicitly described model types. A model of another type whose experts use transformers'
    experts interface in the plain layout is also handled, detected from the built model
    (`architecture_for(model)`); it is not listed here (detection needs the model, not its name)."""
    return sorted(ARCHITECTURES)


def unsupported_model_type_message(model_type, source: str | None = None, detection: str | None = None) -> str:
    """Why a model type cannot be used and how to describe it: the one message of every load path
    (Python API, CLI, budget). `detection` says why detecting it from the built model failed."""
    where = f" (from {source})" if source else ""
    found = f"Detection from the model refused it: {detection}.\n" if detection else ""
    return (
        f"Unknown model_type {model_type!r}{where}; hellora_pl supports {', '.join(supported_model_types())} "
        "(and detects transformers MoE families whose experts use the plain experts-interface layout). "
        "It has no description of where this family's decoder layers, attention, routers and experts live.\n"
        f"{found}"
        "To add one, describe them with hellora_pl.backbones.MoEArchitecture(...) and pass it to "
        "hellora_pl.backbones.register_architecture before loading (see 'Adding an architecture or expert "
        "layout' in ARCHITECTURE.md; the built-in ones are in hellora_pl/backbones/families.py)."
    )


def check_model_type(model_type, source: str | None = None) -> None:
    """Refuse a model type with no registered description (UnsupportedArchitectureError). Only for
    what must be registered (no model to detect from); a config goes through `meta.meta_architecture`."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(unsupported_model_type_message(model_type, source))


_DETECTED: weakref.WeakKeyDictionary[nn.Module, MoEArchitecture] = weakref.WeakKeyDictionary()


def architecture_for(model_or_config, source: str | None = None) -> MoEArchitecture:
    """The description for a model or config: the registered one first, else (for a built model)
    the one detected from it (`detect.detect_architecture`, cached per model), else an error that
    lists what is supported and, where detection refused the model, why (`source`: where the model
    came from, for that message). A config alone knows only registered types: for the others build
    the model on meta first (`backbones.meta.meta_architecture`)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if isinstance(model_or_config, nn.Module):
        if model_or_config in _DETECTED:
            return _DETECTED[model_or_config]
        try:
            arch = detect_architecture(model_or_config)
        except DetectionRefused as refused:
            raise UnsupportedArchitectureError(
                unsupported_model_type_message(model_type, source, detection=refused.reason), refused.reason
            ) from None
        if arch is not None:
            _DETECTED[model_or_config] = arch
            return arch
    raise UnsupportedArchitectureError(unsupported_model_type_message(model_type, source))
