"""What `python -m hellora_pl export` starts from: a fit's checkpoint or its adapter folder.

Both give an `ExportSource`: the backbone to rebuild, the plan, the adapter tensors and, for a
checkpoint, the other model tensors its state dict holds. A checkpoint written by a fit keeps the
plan and the adapters in HotExpertInjectionCallback's state and, in `state_dict`, only the other
trainable tensors (`checkpoint_adapters_only`, the default), everything but the adapters, or (a
sharded checkpoint folder of ModelParallelStrategy) everything. `adapted_model` rebuilds the
adapted model and says which of those tensors differ from the rebuilt base, so an export never
drops a trained tensor without saying so.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .adapters import ADAPTER_FILE, PLAN_FILE, AdapterPlan, adapter_state_dict, inject_adapters, load_adapter_weights
from .adapters.io import (  # SHARDED_METADATA: export_cli names it in its messages
    SHARDED_METADATA,
    checkpoint_plan_states,
    load_checkpoint_metadata,
    portable_name,
)
from .backbones import BackboneConfig
from .loading import load_backbone

_MODULE_PREFIX = "model."  # HelloraModule keeps the backbone in `self.model`


class ExportError(ValueError):
    """A problem with what the user asked for: printed as one message, without a traceback."""


@dataclass
class ExportSource:
    """Everything needed to rebuild the adapted model; `origin` says where it came from, for messages."""

    origin: str
    backbone: BackboneConfig
    plan: AdapterPlan
    adapters: dict[str, torch.Tensor]
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)  # by name in the backbone


@dataclass
class AdaptedModel:
    model: torch.nn.Module
    trained: list[str]  # state-dict tensors that differ from the rebuilt base (copied into the model)
    skipped: list[str]  # 4-bit storage of the frozen base, replaced by its 16-bit weights (nothing to carry)


def backbone_config(fields: object, where: str) -> BackboneConfig:
    """A BackboneConfig from a mapping (a checkpoint's hyper-parameters, a config's model.backbone)."""
    if not isinstance(fields, dict):
        raise ExportError(f"{where} is {fields!r}, not a mapping of BackboneConfig fields.")
    known = {f.name for f in dataclasses.fields(BackboneConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ExportError(f"{where} has unknown fields {unknown}; BackboneConfig has {sorted(known)}.")
    return BackboneConfig(**fields)


def backbone_from_training_config(path: Path) -> BackboneConfig:
    """`model.backbone` of a training YAML (the file given to `fit --config`)."""
    import yaml  # a dependency of jsonargparse

    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ExportError(f"--config {str(path)!r} is not valid YAML: {error}") from None
    backbone = (config or {}).get("model", {}).get("backbone") if isinstance(config, dict) else None
    if backbone is None:
        raise ExportError(
            f"--config {str(path)!r} has no model.backbone; give the training config that defines it, "
            "or the base model with --pretrained ID_OR_DIR."
        )
    return backbone_config(backbone, f"model.backbone in {str(path)!r}")


def read_adapter_folder(path: Path, backbone: BackboneConfig) -> ExportSource:
    plan = AdapterPlan.read(path / PLAN_FILE)
    return ExportSource(f"adapter folder {str(path)!r}", backbone, plan, load_file(str(path / ADAPTER_FILE)))


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / SHARDED_METADATA).is_file()


def read_checkpoint(path: Path) -> ExportSource:
    """A Lightning checkpoint of a HelloraModule fit: one file, or a sharded folder (ModelParallelStrategy)."""
    sharded = is_sharded_checkpoint(path)
    try:
        checkpoint = load_checkpoint_metadata(path)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"Cannot read {str(path)!r} as a Lightning checkpoint: {reason}") from None
    if sharded and isinstance(checkpoint, dict):
        checkpoint["state_dict"] = _sharded_state_dict(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ExportError(f"{str(path)!r} is not a Lightning checkpoint (no state_dict).")
    backbone = checkpoint.get("hyper_parameters", {}).get("backbone")
    if backbone is None:
        raise ExportError(
            f"Checkpoint {str(path)!r} records no backbone in its hyper-parameters, so it was not written by a "
            "HelloraModule fit; export the run's adapter folder instead: --adapter_path <run>/hellora --config "
            "<training yaml>."
        )
    states = list(checkpoint_plan_states(checkpoint).values())
    if len(states) != 1:
        found = "no hellora plan" if not states else f"{len(states)} hellora plans"
        raise ExportError(
            f"Checkpoint {str(path)!r} holds {found} in its callbacks' state (HotExpertInjectionCallback keeps one "
            "there); export the run's adapter folder instead: --adapter_path <run>/hellora --config <training yaml>."
        )
    state_dict = {}
    for key, tensor in checkpoint["state_dict"].items():
        if not key.startswith(_MODULE_PREFIX):
            raise ExportError(f"Checkpoint {str(path)!r} holds {key!r}, which is not a tensor of HelloraModule.model.")
        state_dict[key[len(_MODULE_PREFIX) :]] = tensor
    plan = AdapterPlan.from_dict(states[0]["plan"])
    origin = f"checkpoint {str(path)!r}"
    backbone = backbone_config(backbone, f"{origin}'s backbone")
    return ExportSource(origin, backbone, plan, states[0]["adapters"], state_dict)


def _sharded_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The whole model state dict of a torch.distributed.checkpoint folder, read in this one process.

    Read as torch's `dcp_to_torch_save` and Lightning's `fabric consolidate` read one (torch's planner
    for an empty dict, `no_dist`); the public `dcp.load` returns nothing into an empty dict, and
    `dcp_to_torch_save` would write the whole checkpoint, optimizer states included, to a file first.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    loaded: dict = {}
    planner = _EmptyStateDictLoadPlanner(keys={"state_dict"})  # not the optimizer states
    _load_state_dict(loaded, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
    if "state_dict" not in loaded:
        raise ExportError(f"Sharded checkpoint {str(path)!r} holds no model state_dict.")
    return loaded["state_dict"]


def adapted_model(source: ExportSource) -> AdaptedModel:
    """The base rebuilt in 16 bits, the plan injected, its adapters and the checkpoint's trained tensors loaded."""
    backbone = dataclasses.replace(source.backbone, quantization=None)  # adapters of a 4-bit fit fit its 16-bit base
    model = load_backbone(backbone)
    inject_adapters(model, source.plan, expert_kernel="torch")
    load_adapter_weights(model, source.adapters)
    adapters = {portable_name(name) for name in adapter_state_dict(model)}
    own = model.state_dict(keep_vars=True)
    trained, skipped, unknown = [], [], []
    with torch.no_grad():
        for name, tensor in source.state_dict.items():
            if portable_name(name) in adapters:
                continue  # a sharded checkpoint also keeps the adapters here; they came from the callback's state
            target = own.get(name)
            if source.backbone.quantization and (target is None or tensor.numel() == 0):
                skipped.append(name)  # NF4 codes and scales, or the empty placeholder of a quantized router weight
                continue
            if target is None:
                unknown.append(name)
                continue
            if target.shape != tensor.shape:
                raise ExportError(
                    f"{source.origin} holds {name} with shape {tuple(tensor.shape)}, but the rebuilt backbone has "
                    f"{tuple(target.shape)}; give the backbone the run trained (--pretrained / --config)."
                )
            if not torch.equal(target, tensor.to(target.dtype)):
                target.copy_(tensor)
                trained.append(name)
    if unknown:
        raise ExportError(
            f"{source.origin} holds tensors the rebuilt backbone does not have: {unknown[:5]}"
            f"{'...' if len(unknown) > 5 else ''}; give the backbone the run trained (--pretrained / --config)."
        )
    return AdaptedModel(model, trained, skipped)
