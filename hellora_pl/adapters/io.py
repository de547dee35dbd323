"""Save and load adapters: plan.json plus adapter.safetensors (adapter tensors only); and the plan a
fit's Lightning checkpoint carries, read without Lightning."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .inject import adapter_state_dict, inject_adapters
from .plan import AdapterPlan

PLAN_FILE = "plan.json"
ADAPTER_FILE = "adapter.safetensors"
_PARAMETRIZATION_INDEX = re.compile(r"\.parametrizations\.weight\.\d+\.")


def portable_name(name: str) -> str:
    """An adapter tensor's name without the index of the router parametrization holding it.

    A router LoRA is parametrization 0 on a 16-bit router and 1 on a 4-bit one (its NF4 storage
    comes first), so adapters are saved and matched under this name: trained on a 4-bit base,
    they load into the 16-bit base (to merge or evaluate) and back.
    """
    return _PARAMETRIZATION_INDEX.sub(".parametrizations.weight.", name)


def named_like(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors read from a file, under the names the same adapters have in `model`."""
    names = {portable_name(name): name for name in adapter_state_dict(model)}
    return {names.get(portable_name(name), name): tensor for name, tensor in tensors.items()}


def write_adapter(directory: str | Path, tensors: dict[str, torch.Tensor], plan: AdapterPlan) -> Path:
    """The one writer of adapter.safetensors (under `portable_name`s, CPU, contiguous) and plan.json.

    `tensors` are adapter tensors by their names in the model: `adapter_state_dict(model)`, or the
    whole copies rank 0 gathered from a sharded model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {portable_name(name): t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    save_file(tensors, str(directory / ADAPTER_FILE), metadata={"format": "hellora_pl", "method": plan.method})
    plan.save(directory / PLAN_FILE)
    return directory


def save_adapter(directory: str | Path, model: nn.Module, plan: AdapterPlan) -> Path:
    """Write the adapters injected into `model` (not sharded) and `plan` to `directory`."""
    return write_adapter(directory, adapter_state_dict(model), plan)


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into an injected model; every adapter tensor must be given, and no other.

    Names are compared as `portable_name`s, so a 4-bit model's adapters fit the 16-bit base.
    """
    expected = {portable_name(name): tensor for name, tensor in adapter_state_dict(model).items()}
    tensors = {portable_name(name): tensor for name, tensor in tensors.items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "Adapter tensors do not match the plan injected into this model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. "
            "Load the plan.json that was saved with these weights."
        )
    with torch.no_grad():
        for name, param in expected.items():
            if param.shape != tensors[name].shape:
                raise ValueError(
                    f"Adapter tensor {name} has shape {tuple(tensors[name].shape)}, but the injected plan "
                    f"expects {tuple(param.shape)}; load the plan.json that was saved with these weights."
                )
            param.copy_(tensors[name])


def load_adapter(model: nn.Module, directory: str | Path, expert_kernel: str = "auto") -> AdapterPlan:
    """Inject the plan saved in `directory` into `model` and load its weights."""
    directory = Path(directory)
    weights = directory / ADAPTER_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"No {ADAPTER_FILE} in {str(directory)!r}; give the hellora/ folder written by a fit.")
    plan = AdapterPlan.read(directory / PLAN_FILE)
    inject_adapters(model, plan, expert_kernel)
    load_adapter_weights(model, load_file(str(weights)))
    return plan


# -- the plan in a fit's Lightning checkpoint --------------------------------------------------
# Lightning's file beside a sharded checkpoint's shards: everything but the model and optimizer states.
SHARDED_METADATA = "meta.pt"


def checkpoint_metadata_file(path: str | Path) -> Path:
    """The file that keeps a checkpoint's callbacks' states: the checkpoint file itself, or a sharded
    (FSDP2) checkpoint folder's meta.pt."""
    path = Path(path)
    return path / SHARDED_METADATA if path.is_dir() else path


def load_checkpoint_metadata(path: str | Path, mmap: bool = False):
    """`torch.load` of `checkpoint_metadata_file(path)` onto the CPU, tensors only (weights_only).

    Without the model state of a sharded folder (its shards); with the whole state dict of a file.
    """
    return torch.load(checkpoint_metadata_file(path), map_location="cpu", weights_only=True, mmap=mmap)


def checkpoint_plan_states(checkpoint) -> dict[str, dict]:
    """The callbacks' states in a loaded checkpoint that carry a hellora plan, by state key.

    HotExpertInjectionCallback keeps {"plan": plan.to_dict(), "adapters": {name: tensor}} there.
    """
    callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
    if not isinstance(callbacks, dict):
        return {}
    return {key: state for key, state in callbacks.items() if isinstance(state, dict) and state.get("plan")}
