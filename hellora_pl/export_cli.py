"""`python -m hellora_pl export`: a fit's adapters out as a PEFT LoRA adapter (3D or vLLM's per-expert layout)
or a merged transformers model.

Every argument is checked before any model is loaded, and the export is written into a
temporary folder beside `--out` that is renamed to `--out` only when complete, so a refused or
failed export leaves nothing behind. Problems print one message and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from .adapters import ADAPTER_FILE, PLAN_FILE
from .backbones import DTYPES, BackboneConfig
from .export_sources import (
    SHARDED_METADATA,
    AdaptedModel,
    ExportError,
    ExportSource,
    adapted_model,
    backbone_from_training_config,
    is_sharded_checkpoint,
    read_adapter_folder,
    read_checkpoint,
)

FORMATS = ("peft", "vllm", "merged")
LORA_FORMATS = ("peft", "vllm")  # LoRA adapters: no full-rank deltas, no other trained tensors

DESCRIPTION = """\
Export a hellora_pl fit's adapters for use without hellora_pl.

  --format peft    a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors):
                   PeftModel.from_pretrained(base, OUT) on the same base model.
  --format vllm    a LoRA adapter in the per-expert layout vLLM loads for MoE models
                   (experts.{e}.gate_proj/up_proj/down_proj, every expert, cold ones zero):
                   vllm serve BASE --enable-lora --lora-modules NAME=OUT.
  --format merged  the adapters merged into the base weights, saved with save_pretrained:
                   AutoModelForCausalLM.from_pretrained(OUT).

From a checkpoint (--ckpt_path), the backbone, plan and adapters come from the checkpoint. From an
adapter folder (--adapter_path <run>/hellora, with plan.json and adapter.safetensors), the
backbone comes from the training config (--config) or --pretrained.
"""

EPILOG = """\
examples:
  python -m hellora_pl export --ckpt_path runs/quickstart/hellora/version_0/checkpoints/last.ckpt \\
      --format peft --out exported/peft
  python -m hellora_pl export --adapter_path runs/quickstart/hellora/version_0/hellora \\
      --config configs/quickstart.yaml --format merged --out exported/merged
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hellora_pl export",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--ckpt_path", type=Path, help="a Lightning checkpoint of a hellora_pl fit (a .ckpt file or a sharded folder)"
    )
    source.add_argument(
        "--adapter_path", type=Path, help="a run's adapter folder (<run>/hellora: plan.json, adapter.safetensors)"
    )
    p.add_argument(
        "--config",
        type=Path,
        help="the training YAML whose model.backbone is the base (with --adapter_path; a checkpoint records its own)",
    )
    p.add_argument(
        "--pretrained",
        help="hub id or local directory of the base model, instead of the training backbone's source "
        "(e.g. a local copy of the model the run trained on)",
    )
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="peft: a PEFT LoRA adapter; vllm: a LoRA adapter in vLLM's per-expert MoE layout; merged: a merged model",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder: must not exist, or be empty")
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        help="dtype of the merged model's weights (--format merged; default: the training backbone's dtype). "
        "The merge itself runs in the training dtype.",
    )
    return p


@dataclass
class Request:
    ckpt_path: Path | None
    adapter_path: Path | None
    config: Path | None
    pretrained: str | None
    format: str
    out: Path
    dtype: str | None


def checked(args: argparse.Namespace) -> Request:
    """Every check that needs no model: paths exist, the output is free, the options fit together."""
    request = Request(**vars(args))
    if request.ckpt_path is not None:
        path = request.ckpt_path
        if not path.exists():
            raise ExportError(f"--ckpt_path {str(path)!r} does not exist; give a .ckpt file written by a fit.")
        if path.is_dir() and not is_sharded_checkpoint(path):
            raise ExportError(
                f"--ckpt_path {str(path)!r} is a folder without {SHARDED_METADATA}, so not a sharded Lightning "
                "checkpoint; give a .ckpt file, or the run's adapter folder with --adapter_path."
            )
        if request.config is not None:
            raise ExportError(
                "--config is for --adapter_path: a checkpoint records its own backbone. Drop --config, or give "
                "--pretrained ID_OR_DIR to load the base from elsewhere."
            )
    else:
        path = request.adapter_path
        if not path.is_dir():
            raise ExportError(
                f"--adapter_path {str(path)!r} is not a folder; give the hellora/ folder a fit writes "
                "(<log dir>/hellora, with plan.json and adapter.safetensors)."
            )
        for needed in (PLAN_FILE, ADAPTER_FILE):
            if not (path / needed).is_file():
                raise ExportError(
                    f"--adapter_path {str(path)!r} has no {needed}; give the hellora/ folder a fit writes "
                    "(<log dir>/hellora, with plan.json and adapter.safetensors)."
                )
        if request.config is None and request.pretrained is None:
            raise ExportError(
                "An adapter folder does not record its base model: give the training YAML with --config FILE "
                "(its model.backbone is used), or the base with --pretrained ID_OR_DIR."
            )
        if request.config is not None and not request.config.is_file():
            raise ExportError(f"--config {str(request.config)!r} is not a file; give the training YAML.")
    if request.pretrained is not None:
        local = request.pretrained.startswith((".", "/", "~"))
        if local and not Path(request.pretrained).expanduser().exists():
            raise ExportError(
                f"--pretrained {request.pretrained!r} does not exist; give a local model folder or a hub id."
            )
    if request.dtype is not None and request.format != "merged":
        raise ExportError(
            f"--dtype {request.dtype} applies to --format merged only; a LoRA adapter keeps the adapters' own dtype "
            "(the plan's adapter_dtype). Drop --dtype."
        )
    out = request.out
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {str(out)!r} exists and is not a folder; give a new or empty folder.")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {str(out)!r} is not empty; give a new or empty folder (nothing was written).")
    return request


def read_source(request: Request) -> ExportSource:
    if request.ckpt_path is not None:
        source = read_checkpoint(request.ckpt_path)
    else:
        if request.config is not None:
            backbone = backbone_from_training_config(request.config)
        else:
            backbone = BackboneConfig(pretrained=request.pretrained)
        source = read_adapter_folder(request.adapter_path, backbone)
    if request.pretrained is not None and source.backbone.pretrained != request.pretrained:
        overrides = source.backbone.config if source.backbone.pretrained is not None else {}
        source.backbone = replace(source.backbone, pretrained=request.pretrained, model_type=None, config=overrides)
    if request.format in LORA_FORMATS and source.plan.expert_adapter == "full":
        raise ExportError(
            f"The {source.plan.method!r} plan of {source.origin} holds full-rank expert deltas, which are not LoRA "
            f"and cannot be written as a LoRA adapter (--format {request.format}); use --format merged."
        )
    return source


def export(request: Request, source: ExportSource, adapted: AdaptedModel) -> list[str]:
    """Write the export into a temporary folder beside --out, then rename it to --out; the lines to print."""
    from .adapters import export_merged, export_peft, merge_adapters

    if request.format in LORA_FORMATS and adapted.trained:
        raise ExportError(
            f"{source.origin} holds trained tensors outside the adapters ({_names(adapted.trained)}), which a LoRA "
            "adapter cannot carry; use --format merged."
        )
    out = request.out.resolve()
    created = [folder for folder in reversed(out.parents) if not folder.exists()]  # removed again on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()  # not tempfile.mkdtemp: its mode 0700 would become --out's
    try:
        if request.format == "peft":
            base_name = source.backbone.pretrained
            export_peft(adapted.model, source.plan, staging, base_model_name_or_path=base_name, overwrite=True)
        elif request.format == "vllm":
            from .adapters.export_vllm import export_vllm

            base_name = source.backbone.pretrained
            export_vllm(adapted.model, source.plan, staging, base_model_name_or_path=base_name, overwrite=True)
        else:
            implementation = source.backbone.experts_implementation
            merge_adapters(adapted.model, experts_implementation=implementation, plan=source.plan)
            if request.dtype is not None:
                adapted.model.to(DTYPES[request.dtype])
            export_merged(adapted.model, staging, overwrite=True, experts_implementation=implementation)
        if out.is_dir():
            out.rmdir()  # empty (checked): the finished export takes its place
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise
    return report(request, source, adapted, out)


def report(request: Request, source: ExportSource, adapted: AdaptedModel, out: Path) -> list[str]:
    from safetensors import safe_open

    tensors = params = 0
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                tensors += 1
                params += math.prod(f.get_slice(key).get_shape())
    plan = source.plan
    lines = [
        f"[hellora] exported method {plan.method} ({plan.architecture}, {len(plan.layers)} MoE layers) "
        f"from {source.origin}",
        f"[hellora]   format: {request.format}",
        f"[hellora]   wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}",
        f"[hellora]   {tensors:,} tensors, {params:,} parameters",
    ]
    if request.format == "peft":
        lines[-1] += (
            f" (the run trained {plan.trainable_params:,}; PEFT holds every expert of an adapted projection, "
            "cold experts and unused rank slices as zeros)"
        )
    elif request.format == "vllm":
        lines[-1] += (
            f" (the run trained {plan.trainable_params:,}; vLLM needs every expert of an adapted layer, "
            "cold experts and unused rank slices as zeros)"
        )
    if adapted.trained:
        count, names = len(adapted.trained), _names(adapted.trained)
        lines.append(f"[hellora]   merged in {count} trained tensors from the checkpoint's state_dict: {names}")
    if source.backbone.quantization:
        lines.append(
            f"[hellora]   the run trained on a {source.backbone.quantization} base; exported against its 16-bit "
            f"weights ({len(adapted.skipped)} tensors of 4-bit storage in the checkpoint not needed)"
        )
    lines.append("[hellora] load it with:")
    if request.format == "peft":
        lines += [
            "    from peft import PeftModel",
            *_base_loader(source),
            f"    model = PeftModel.from_pretrained(base, {str(out)!r})",
        ]
    elif request.format == "vllm":
        rank = _adapter_rank(out)
        base = source.backbone.pretrained or "BASE"
        lines.append(f"    vllm serve {base} --enable-lora --max-lora-rank {rank} --lora-modules hellora={out}")
    else:
        lines += [
            "    from transformers import AutoModelForCausalLM",
            f"    model = AutoModelForCausalLM.from_pretrained({str(out)!r})",
        ]
    if source.backbone.pretrained is not None:
        lines.append(f"[hellora]   the tokenizer is not included: load it from {source.backbone.pretrained!r}")
    return lines


def _base_loader(source: ExportSource) -> list[str]:
    """Lines that load the base the adapter applies to (16-bit, as exported)."""
    backbone = replace(source.backbone, quantization=None)
    if backbone.model_type is None and not backbone.config and backbone.revision is None:
        return [
            "    from transformers import AutoModelForCausalLM",
            f"    base = AutoModelForCausalLM.from_pretrained({backbone.pretrained!r})",
        ]
    return [
        "    import hellora_pl  # the base as the run built it",
        f"    base = hellora_pl.load_backbone(hellora_pl.{backbone!r})",
    ]


VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks (vllm 0.33)


def _adapter_rank(out: Path) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds the exported adapter_config.json's r."""
    import json

    rank = int(json.loads((out / "adapter_config.json").read_text())["r"])
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), rank)


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        request = checked(args)
        source = read_source(request)
        adapted = adapted_model(source)
        lines = export(request, source, adapted)
    except (ExportError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print("\n".join(lines))


if __name__ == "__main__":
    main()
