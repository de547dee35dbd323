"""Models hellora_pl pretrains and ships itself, named ``hellora:<name>`` wherever a model or a
tokenizer is named (``BackboneConfig.pretrained``, a datamodule's ``tokenizer``).

They live in the checkout's ``models/`` folder, beside the package rather than inside it, so the
name resolves in a checkout or an editable install (``pip install -e .``).
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_PREFIX = "hellora:"
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
SHIPPED_MODELS = {"mini-olmoe": "hellora-mini-olmoe"}  # name -> folder under models/


def resolve_shipped(name: str) -> str:
    """The local folder of a shipped model named ``hellora:<name>``; any other value unchanged."""
    if not name.startswith(SHIPPED_PREFIX):
        return name
    key = name[len(SHIPPED_PREFIX) :]
    if key not in SHIPPED_MODELS:
        known = ", ".join(SHIPPED_PREFIX + k for k in SHIPPED_MODELS)
        raise ValueError(f"unknown shipped model {name!r}; hellora_pl ships {known}")
    folder = MODELS_DIR / SHIPPED_MODELS[key]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{name} ships in the hellora_pl repository's models/ folder, but {folder} holds no config.json: "
            "install hellora_pl from a checkout (pip install -e .), or give the model folder's path instead"
        )
    return str(folder)
