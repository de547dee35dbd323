"""Write configs/tiny/<backbone>/<method>_math.yaml: every backbone family x every method, on CPU.

The tiny twins build a two-layer model of each family from its config (hellora_pl.backbones.tiny)
and train on hellora_pl's synthetic arithmetic word problems, so they run anywhere with no
network. A test checks the files are what this script writes:

    python configs/generate.py          # rewrite the files
    python configs/generate.py --check  # exit 1 if a file differs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from hellora_pl.adapters.methods import METHOD_DEFAULTS
from hellora_pl.backbones.tiny import TINY_CONFIGS

ROOT = Path(__file__).resolve().parent
TINY_OVERRIDES = {"vocab_size": 128, "max_position_embeddings": 256}  # the character tokenizer: 100 ids, long prompts

COMPANIONS = {
    "hellori": {
        "class_path": "hellora_pl.LoRIMaskCallback",
        "init_args": {"density": 0.1, "granularity": "model", "dense_steps": 0.5},
    },
    "dr_lora": {
        "class_path": "hellora_pl.DynamicRankCallback",
        "init_args": {"rank_init": 4, "rank_max": 16, "interval": 10},
    },
}


def tiny_config(backbone: str, method: str) -> dict:
    model_type, fields = TINY_CONFIGS[backbone]
    run_dir = f"runs/tiny/{backbone}/{method}_math"
    callbacks = [
        {"class_path": "hellora_pl.RoutingProfilerCallback", "init_args": {"fraction": 0.1, "watch_every_n_steps": 20}},
        {
            "class_path": "hellora_pl.HotExpertInjectionCallback",
            "init_args": {"method": method, "rank": 8, "alpha": 16},
        },
    ]
    if method in COMPANIONS:
        callbacks.append(COMPANIONS[method])
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 60,
            "val_check_interval": 20,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "gradient_clip_val": 1.0,
            "log_every_n_steps": 10,
            "default_root_dir": run_dir,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": run_dir, "name": "hellora"},
            },
            "callbacks": callbacks,
        },
        "model": {
            "backbone": {"model_type": model_type, "config": {**fields, **TINY_OVERRIDES}, "seed": 0},
            "learning_rate": 0.01,
            "warmup": 0.05,
        },
        "data": {
            "class_path": "hellora_pl.datamodules.ArithmeticDataModule",
            "init_args": {"tokenizer": "builtin:char", "num_train": 800, "num_val": 64, "batch_size": 8, "max_length": 160},
        },
    }


def render(backbone: str, method: str) -> str:
    header = (
        f"# Tiny {backbone} twin, method {method} ({METHOD_DEFAULTS[method].summary}), on synthetic arithmetic\n"
        "# word problems. Random weights, CPU, no network. Written by configs/generate.py; edit that instead.\n"
        f"#   python -m hellora_pl fit --config configs/tiny/{backbone}/{method}_math.yaml\n"
    )
    return header + yaml.safe_dump(tiny_config(backbone, method), sort_keys=False)


def expected_files() -> dict[Path, str]:
    return {
        ROOT / "tiny" / backbone / f"{method}_math.yaml": render(backbone, method)
        for backbone in TINY_CONFIGS
        for method in METHOD_DEFAULTS
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--check", action="store_true", help="report files that differ, write nothing")
    args = parser.parse_args(argv)
    stale = [path for path, text in expected_files().items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(ROOT.parent)}")
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(expected_files()[path])
    print(f"wrote {len(stale)} config files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
