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


def architecture_for(model_or_config) -> MoEArchitecture:
    """The description for a model or config, or an error that lists what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"Architecture {model_type!r} is not supported by hellora_pl. Supported model types: "
            f"{', '.join(supported_model_types())}. To add one, describe where its routers, experts "
            "and attention live with hellora_pl.backbones.MoEArchitecture(...) and pass it to "
            "hellora_pl.backbones.register_architecture (see hellora_pl/backbones/families.py)."
        )
    return ARCHITECTURES[model_type]
