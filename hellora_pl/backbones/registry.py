"""The supported architectures, looked up by `config.model_type`."""

from __future__ import annotations

from .architecture import MoEArchitecture

ARCHITECTURES: dict[str, MoEArchitecture] = {}


class UnsupportedArchitectureError(ValueError):
    pass


def register_architecture(arch: MoEArchitecture) -> MoEArchitecture:
    """Make `arch` known for each of its `model_types` (replacing an earlier description)."""
    for model_type in arch.model_types:
        ARCHITECTURES[model_type] = arch
    return arch


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def unsupported_model_type_message(model_type, source: str | None = None) -> str:
    """Why a model type cannot be used and how to describe it: the one message of every load path
    (Python API, CLI, budget)."""
    where = f" (from {source})" if source else ""
    return (
        f"Unknown model_type {model_type!r}{where}; hellora_pl supports {', '.join(supported_model_types())}. "
        "It has no description of where this family's decoder layers, attention, routers and experts live.\n"
        "To add one, describe them with hellora_pl.backbones.MoEArchitecture(...) and pass it to "
        "hellora_pl.backbones.register_architecture before loading (see 'Adding an architecture or expert "
        "layout' in ARCHITECTURE.md; the built-in ones are in hellora_pl/backbones/families.py)."
    )


def check_model_type(model_type, source: str | None = None) -> None:
    """Refuse a model type with no registered description (UnsupportedArchitectureError)."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(unsupported_model_type_message(model_type, source))


def architecture_for(model_or_config) -> MoEArchitecture:
    """The description for a model or config, or an error that lists what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    check_model_type(model_type)
    return ARCHITECTURES[model_type]
