"""The backbone a budget is counted on: a built-in shape, a local config.json, or a hub id."""

from __future__ import annotations

import json
from pathlib import Path

from ..backbones.registry import ARCHITECTURES, check_model_type
from ..backbones.shapes import SHAPES, shape_config


def load_config(shape: str | None = None, config: str | None = None, model: str | None = None):
    """The transformers config of a built-in shape, a local config.json (or its folder), or a hub id.

    Returns (config, description of the source).
    """
    if shape is not None:
        cfg = shape_config(shape)
        return cfg, f"shape {shape} ({SHAPES[shape].hub_id})"
    if config is not None:
        return _local_config(config)
    if model is not None:
        return _hub_config(model)
    raise ValueError("Give a backbone: --shape NAME, --config PATH or --model HUB_ID.")


def _local_config(config: str):
    from transformers import AutoConfig

    path = Path(config).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Config path {config!r} does not exist; give a config.json or a directory holding one "
            "(or use --shape NAME / --model HUB_ID)."
        )
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"Directory {config!r} holds no config.json; give the model's config.json or its directory."
            )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc}); give the model's config.json.") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    _check_model_type(model_type, str(path))
    try:
        cfg = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"transformers could not read {str(path)!r} as a {model_type!r} config ({one_line(exc, 200)}); "
            "budget builds only model types transformers ships (no remote code)."
        ) from None
    return cfg, f"config {path}"


def _hub_config(model: str):
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model)
    except Exception as exc:  # offline, unknown id, gated repo, remote code: all end here
        raise ValueError(
            f"Could not read the config of {model!r} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{one_line(exc, 200)}); check the id and the network, or use --config with a local config.json "
            "or --shape NAME."
        ) from None
    _check_model_type(getattr(cfg, "model_type", None), model)
    return cfg, f"hub {model}"


def _check_model_type(model_type, where: str) -> None:
    """A type transformers does not ship is refused here; the others are detected from the model
    built on meta (budget.cli.run), so a detected family needs no description."""
    from transformers import CONFIG_MAPPING

    if model_type is None:
        raise ValueError(f"{where!r} has no model_type field; give a transformers config.json.")
    if model_type not in CONFIG_MAPPING and model_type not in ARCHITECTURES:
        check_model_type(model_type, where)


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line, cut at `limit` characters."""
    text = " ".join(str(exc).split())
    return text if limit is None or len(text) <= limit else text[:limit] + "..."
