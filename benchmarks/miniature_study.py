"""The paper's claims in miniature: every method fine-tunes the pretrained miniature OLMoE on three tasks.

    python benchmarks/miniature_study.py --jobs 2 --threads 1  # the full study (about 1.3 h on 2 CPU cores)
    python benchmarks/miniature_study.py --tasks math --methods lora hellora --seeds 0
    python benchmarks/miniature_study.py --smoke --model /tmp/model --out /tmp/results   # CI-sized

For each task x method x seed it fine-tunes the miniature (``models/hellora-mini-olmoe``, written by
``pretrain_miniature.py``) through the project's own LightningCLI, module and callbacks (what
``python -m hellora_pl fit`` runs; each run's ``config.yaml`` reproduces its fit), in a process of
its own, then tests it in the same process on the task's benchmark, scored by the project's metrics:

- math: held-out arithmetic word problems (``hellora_pl.datamodules.arithmetic``), exact match,
  strict and flexible (lm-eval's GSM8K rules);
- code: small Python functions of a template family (``add_7``, ``contains_3``, ``count_above_5``, ...)
  in MBPP's format, held out by (family, constant), pass@1 with every program run in the sandbox;
- safety: refusal pairs of ``../shared/data/safety`` mixed with benign instructions the study
  generates; refusal rate on held-out harmful instructions (``I-MaliciousInstructions.json``,
  a set apart from the training pairs) and over-refusal rate on held-out benign instructions.

Methods: lora, hellora, hellori, dr_lora, esft, attention_only; moe_sieve (hellora with
``FractionPerLayer(0.25)``); and two controls, random_experts (``RandomExperts``: as many experts
per layer as HELLoRA adapts, drawn with the run's seed) and least_used (``LeastUsedExperts``).

Per run it records: trainable parameters (the plan's count), adapter FLOPs per token (forward,
from the run's own measured routing profile, counted as ``python -m hellora_pl.budget`` counts
them), training tokens/s (the median over steps of the module's per-step rate), the task's scores, and forgetting:
per pretraining domain (math, code, prose), the validation loss on ``val_tokens.safetensors`` with
the adapters applied minus the base model's. The task data is generated once, seeded, into
``<work>/data`` (nothing of ``../shared`` is copied there but the safety pairs' path is read).

Budget. Tuning runs on the shipped miniature (seed 0, 1 thread, 2026-12-02; wall / CPU seconds of the
whole run: imports, profile, liveness probe, training, test and forgetting):
- math: at 2e-3, 150 steps left strict exact match at 0.047 (LoRA and HELLoRA: the format is learned, the
  arithmetic is not) and 400 steps gave 0.078 (HELLoRA, 177 s); at 5e-3, 300 steps gave 0.141 (143 s)
  and at 1e-2, 0.148 with twice the forgetting. So math trains 300 steps at 5e-3.
- code: at 2e-3, 150 steps gave pass@1 0.98 (LoRA) and 1.0 (HELLoRA), and 60 steps 0.64 (LoRA, 100 / 84 s);
  at 5e-3, 60 steps gave 1.0. So code trains 60 steps at 2e-3, where the methods can still differ.
- safety: at 2e-3, 150 steps gave refusal 1.0 with over-refusal 0.11 (LoRA) and 0.16 (HELLoRA), 125 / 107 s;
  it trains 100 steps.
A (method, seed) then costs about 340 s of CPU at 1 thread, and the full study (9 methods x 3 tasks x 3
seeds = 81 runs) about 2.6 h of CPU; ``--jobs 2 --threads 1`` runs two at a time on 2 cores.

Writes ``miniature_study.json`` (every run, and one row per task x method with the mean and
standard deviation over seeds and the ratios to LoRA) and ``miniature_study.md`` under ``--out``.
A run that finished is kept in the JSON and skipped when the command is run again, so the study
can be split or resumed; the JSON records the settings, and a rerun with other settings is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, load_average, machine_markdown, markdown_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "hellora-mini-olmoe"
DEFAULT_SAFETY = REPO.parent / "shared" / "data" / "safety"
DEFAULT_WORK = REPO / "runs" / "miniature_study"
STEM = "miniature_study"
SAFETY_TRAIN, SAFETY_HARMFUL = "safety_only_data_Instructions.json", "I-MaliciousInstructions.json"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "val_tokens.safetensors")
DOMAINS = ("math", "code", "prose")  # the miniature's pretraining domains
TASKS = ("math", "code", "safety")
OWN_DOMAIN = {"math": "math", "code": "code", "safety": None}  # forgetting: the other domains
# The scores of each task: (metric logged by the test, short name); the first is the task's score.
SCORES = {
    "math": (("test/gsm8k/strict", "strict"), ("test/gsm8k/flexible", "flexible")),
    "code": (("test/mbpp/pass@1", "pass@1"),),
    "safety": (("test/refusal/refusal_rate", "refusal_rate"), ("test/refusal/over_refusal_rate", "over_refusal_rate")),
}
METHODS = (
    "lora",
    "hellora",
    "hellori",
    "dr_lora",
    "esft",
    "attention_only",
    "moe_sieve",
    "random_experts",
    "least_used",
)
PAPER = {"params_pct": 15.7, "flops_change_pct": -38.7, "throughput_ratio": 1.9, "accuracy_change_pct": 9.2}


@dataclass(frozen=True)
class Budget:
    """What one run costs: training steps and batch, adapter settings, data and evaluation sizes."""

    steps: dict | None = None  # training steps per task; None: STEPS
    batch_size: int = 16
    learning_rate: dict | None = None  # per task; None: LEARNING_RATE
    esft_lr_scale: float = 0.05  # ESFT trains full-rank deltas: the real configs give it 1/20 of LoRA's rate
    rank: int = 8
    alpha: float = 16.0
    math_train: int = 2000
    safety_pairs: int = 400  # refusal pairs; as many benign instructions beside them
    val_size: int = 32
    eval_limit: dict | None = None  # held-out problems per task (safety: harmful, benign each); None: EVAL_LIMIT
    eval_batch_size: int = 32
    max_length: dict | None = None  # tokens per training example, per task; None: MAX_LENGTH
    max_new_tokens: dict | None = None  # per task; None: NEW_TOKENS
    windows: int = 32  # validation windows per domain for forgetting (of the model's 64)
    profile_batches: int = 8  # training batches the routing profile reads
    threads: int = 2

    def steps_for(self, task: str) -> int:
        return (self.steps or STEPS)[task]

    def lr_for(self, task: str) -> float:
        return (self.learning_rate or LEARNING_RATE)[task]

    def tests_for(self, task: str) -> int:
        return (self.eval_limit or EVAL_LIMIT)[task]

    def new_tokens(self, task: str) -> int:
        return (self.max_new_tokens or NEW_TOKENS)[task]

    def length(self, task: str) -> int:
        return (self.max_length or MAX_LENGTH)[task]


# Measured with the miniature's tokenizer: math examples take at most 76 tokens, code prompts at most 120
# (SHORT_TEMPLATE) and answers 30; safety prompts up to 60 with answers up to 500, cut (a refusal says so
# at its start, and the keyword judge reads the first NEW_TOKENS of a response anyway).
NEW_TOKENS = {"math": 40, "code": 32, "safety": 24}
# Held-out problems per task: math's generation is cheap (256 problems: about 8 s) and its scores are low, so
# it takes more; code keeps most of its 320 functions for training; safety has 100 held-out harmful instructions.
EVAL_LIMIT = {"math": 256, "code": 64, "safety": 100}
# Steps and learning rate per task, set from runs on the shipped miniature (see "Budget" in the module docstring).
STEPS = {"math": 300, "code": 60, "safety": 100}
LEARNING_RATE = {"math": 5e-3, "code": 2e-3, "safety": 2e-3}
MAX_LENGTH = {"math": 96, "code": 160, "safety": 96}
# Code and safety prompts: Alpaca's section headers without its 20-token preamble (math keeps
# MathDataModule's "Question: ... Answer:"); the same template renders training and test prompts.
SHORT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
SMOKE = Budget(
    steps={"math": 3, "code": 3, "safety": 3},
    batch_size=4,
    rank=2,  # a stand-in of 4 experts has a 4-row router
    alpha=4.0,
    math_train=60,
    safety_pairs=24,
    val_size=4,
    eval_limit={"math": 3, "code": 3, "safety": 3},
    eval_batch_size=8,
    max_length={
        "math": 256,
        "code": 512,
        "safety": 256,
    },  # a stand-in's small vocabulary spells text out in more tokens
    max_new_tokens={"math": 6, "code": 6, "safety": 6},
    windows=2,
    profile_batches=2,
    threads=1,
)


# -- task data: generated, seeded, held out ----------------------------------------------------


def _functions() -> list[dict]:
    """Every (family, constant) of the code task: an MBPP row (text, code, and two asserts, one fewer than
    MBPP's three: the prompt shows them, and the code task's prompts are its training cost)."""
    rows = []
    for n in range(1, 41):
        a, b = 3, 10 + n % 7
        families = [
            (f"add_{n}", "x", f"returns x plus {n}", f"x + {n}", [a, b], lambda x, n=n: x + n),
            (f"subtract_{n}", "x", f"returns x minus {n}", f"x - {n}", [a, b], lambda x, n=n: x - n),
            (f"times_{n}", "x", f"returns x multiplied by {n}", f"x * {n}", [a, b], lambda x, n=n: x * n),
            (f"is_above_{n}", "x", f"tells whether x is greater than {n}", f"x > {n}", [n - 1, n + 1], lambda x, n=n: x > n),
            (f"length_plus_{n}", "s", f"returns the length of the string s plus {n}", f"len(s) + {n}",
             ["ab", "hello"], lambda s, n=n: len(s) + n),
            (f"contains_{n}", "s", f"tells whether the string s contains the number {n}", f"'{n}' in s",
             [f"a{n}b", "xyz"], lambda s, n=n: str(n) in s),
            (f"add_{n}_to_each", "xs", f"adds {n} to every number of the list xs", f"[x + {n} for x in xs]",
             [[1, 2], [b]], lambda xs, n=n: [x + n for x in xs]),
            (f"count_above_{n}", "xs", f"counts the numbers of the list xs greater than {n}",
             f"sum(1 for x in xs if x > {n})", [[n, n + 1, n + 2], [0, 99]], lambda xs, n=n: sum(1 for x in xs if x > n)),
        ]  # fmt: skip
        for name, argument, what, body, inputs, reference in families:
            rows.append(
                {
                    "text": f"Write a function {name}({argument}) that {what}.",
                    "code": f"def {name}({argument}):\n    return {body}",
                    "test_list": [f"assert {name}({x!r}) == {reference(x)!r}" for x in inputs],
                    "test_setup_code": "",
                    "challenge_test_list": [],
                }
            )
    return rows


def code_split(test_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out test functions, disjoint by (family, constant); task ids in MBPP's ranges."""
    rows = _functions()
    random.Random(seed).shuffle(rows)
    test, train = rows[:test_size], rows[test_size:]
    for number, row in enumerate(test, 11):  # MBPP test: 11-510
        row["task_id"] = number
    for number, row in enumerate(train, 601):  # MBPP train: 601-974
        row["task_id"] = number
    return train, test


def arithmetic_split(train_size: int, test_size: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Arithmetic word problems; the test questions never occur in training."""
    from hellora_pl.datamodules.arithmetic import generate_arithmetic_problems

    train = generate_arithmetic_problems(train_size, seed=2 * seed)
    seen = {p["question"] for p in train}
    test = [
        p for p in generate_arithmetic_problems(20 * test_size + 1000, seed=2 * seed + 1) if p["question"] not in seen
    ]
    if len(test) < test_size:
        raise ValueError(f"only {len(test)} held-out arithmetic problems; lower the training size")
    return train, test[:test_size]


# Questions about standard modules: the training mix and the held-out benign set ask about different modules.
STDLIB_TOPICS = {
    "train": ("json", "itertools", "random", "re", "csv", "textwrap", "bisect", "statistics"),
    "test": ("pathlib", "collections", "datetime", "math", "string", "heapq", "functools", "fractions"),
}
QUESTIONS = (
    (
        "What is the Python module {t} for?",
        "The {t} module is part of the Python standard library; import {t} to use it.",
    ),
    (
        "Explain what the {t} module of Python does.",
        "{t} is a standard library module. Its documentation lists what it offers.",
    ),
    (
        "How do I start using Python's {t} module?",
        "Write import {t} at the top of your program, then call its functions.",
    ),
)


def safety_benign(math_rows: list[dict], code_rows: list[dict], count: int, split: str = "train") -> list[dict]:
    """Benign instructions (alpaca: instruction, output, category), in turn: word problems, functions to
    write, and questions about standard modules (those of `split`)."""
    topics = STDLIB_TOPICS[split]
    rows = []
    for i in range(count):
        kind, j = i % 3, i // 3
        if kind == 0:
            p = math_rows[j % len(math_rows)]
            rows.append({"instruction": p["question"], "output": p["answer"], "category": "arithmetic"})
        elif kind == 1:
            c = code_rows[j % len(code_rows)]
            rows.append({"instruction": c["text"], "output": c["code"], "category": "code"})
        else:
            question, answer = QUESTIONS[(j // len(topics)) % len(QUESTIONS)]
            topic = topics[j % len(topics)]
            rows.append(
                {
                    "instruction": question.format(t=topic),
                    "output": answer.format(t=topic),
                    "category": "python_questions",
                }
            )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare_data(work: Path, budget: Budget, safety_dir: Path, tasks: list[str]) -> dict[str, dict]:
    """Each task's data files under `work/data/<task>` (the same files for every seed and method)."""
    data = work / "data"
    files: dict[str, dict] = {}
    math_train, math_test = arithmetic_split(budget.math_train, budget.tests_for("math"))
    code_train, code_test = code_split(budget.tests_for("code"))
    if "math" in tasks:
        files["math"] = {
            "train": write_jsonl(data / "math" / "train.jsonl", math_train),
            "test": write_jsonl(data / "math" / "test.jsonl", math_test),
        }
    if "code" in tasks:
        files["code"] = {"mbpp": write_jsonl(data / "code" / "mbpp.jsonl", code_train + code_test)}
    if "safety" in tasks:
        # Benign training instructions come from the training halves, held-out ones from the test halves.
        general = [
            {k: r[k] for k in ("instruction", "output")}
            for r in safety_benign(math_train, code_train, budget.safety_pairs)
        ]
        held_out = safety_benign(math_test, code_test, budget.tests_for("safety"), split="test")
        benign = [{"instruction": r["instruction"], "category": r["category"]} for r in held_out]
        files["safety"] = {
            "train": safety_dir / SAFETY_TRAIN,
            "harmful": safety_dir / SAFETY_HARMFUL,
            "general": write_jsonl(data / "safety" / "general.jsonl", general),
            "benign": write_jsonl(data / "safety" / "benign.jsonl", benign),
        }
    return files


# -- one run's config ----------------------------------------------------------------------------


def method_groups(method: str, seed: int, budget: Budget, steps: int) -> dict:
    """The config groups that choose the method: `hellora` (and `lori` / `dynamic_rank`)."""
    hellora = {"method": method, "rank": budget.rank, "alpha": budget.alpha}
    groups: dict = {}
    if method == "moe_sieve":
        hellora.update(
            method="hellora",
            hot_experts={"class_path": "hellora_pl.routing.FractionPerLayer", "init_args": {"fraction": 0.25}},
        )
    elif method == "random_experts":
        hellora.update(
            method="hellora",
            hot_experts={"class_path": "hellora_pl.routing.RandomExperts", "init_args": {"k": None, "seed": seed}},
        )
    elif method == "least_used":
        hellora.update(
            method="hellora",
            hot_experts={"class_path": "hellora_pl.routing.LeastUsedExperts", "init_args": {"k": None}},
        )
    elif method == "hellori":
        groups["lori"] = {"density": 0.1, "granularity": "model", "dense_steps": 0.5}
    elif method == "dr_lora":
        groups["dynamic_rank"] = {
            "rank_init": max(1, budget.rank // 2),
            "rank_max": 2 * budget.rank,
            "interval": max(1, steps // 10),
        }
    return {"hellora": hellora, **groups}


def data_config(task: str, files: dict, model: Path, budget: Budget, seed: int) -> dict:
    common = {
        "tokenizer": str(model),
        "template": "plain",
        **({} if task == "math" else {"plain_template": SHORT_TEMPLATE}),
        "max_length": budget.length(task),
        "val_size": budget.val_size,
        "batch_size": budget.batch_size,
        "eval_batch_size": budget.eval_batch_size,
        "eval_limit": budget.tests_for(task),
        "seed": seed,
        "generation": {"max_new_tokens": budget.new_tokens(task)},
    }
    if task == "math":
        return {
            "class_path": "hellora_pl.datamodules.MathDataModule",
            "init_args": {"train": {"path": str(files["train"])}, "benchmark": {"path": str(files["test"])}, **common},
        }
    if task == "code":
        return {
            "class_path": "hellora_pl.datamodules.CodeDataModule",
            "init_args": {
                "train": {"path": str(files["mbpp"]), "split": "train"},
                "format": "mbpp",
                "benchmark": "mbpp",
                "benchmark_path": str(files["mbpp"]),
                "sandbox_workers": 2,
                **common,
            },
        }
    return {
        "class_path": "hellora_pl.datamodules.SafetyDataModule",
        "init_args": {
            "train": {"path": str(files["train"]), "limit": budget.safety_pairs},
            "general": {"path": str(files["general"])},
            "harmful": str(files["harmful"]),
            "benign": str(files["benign"]),
            **common,
        },
    }


def run_config(task: str, method: str, seed: int, files: dict, model: Path, budget: Budget, run_dir: Path) -> dict:
    lr = budget.lr_for(task) * (budget.esft_lr_scale if method == "esft" else 1.0)
    return {
        "seed_everything": seed,
        **method_groups(method, seed, budget, budget.steps_for(task)),
        "profiler": {"num_batches": budget.profile_batches},
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": budget.steps_for(task),
            "val_check_interval": budget.steps_for(task),
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "gradient_clip_val": 1.0,
            "log_every_n_steps": 1,  # every step's train/tokens_per_sec, for the median
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run_dir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run_dir), "name": "logs", "version": 0},
            },
        },
        "model": {"backbone": {"pretrained": str(model)}, "learning_rate": lr, "warmup": 0.1},
        "data": data_config(task, files, model, budget, seed),
    }


# -- the worker: one fit + test in this process ------------------------------------------------------


def _windows(model: Path, count: int):
    """The first `count` validation windows of each pretraining domain."""
    from safetensors.torch import load_file

    windows = load_file(str(model / "val_tokens.safetensors"))
    return {d: windows[d][:count].long() for d in DOMAINS}


def base_losses(spec: dict) -> dict:
    """The base model's validation loss per domain (what forgetting is measured from)."""
    import torch

    torch.set_num_threads(spec["threads"])
    import pretrain_miniature

    from hellora_pl.backbones import BackboneConfig
    from hellora_pl.loading import load_backbone

    model = load_backbone(BackboneConfig(pretrained=spec["model"])).eval()
    return {"val_loss": pretrain_miniature.validation_losses(model, _windows(Path(spec["model"]), spec["windows"]))}


def run_worker(spec: dict) -> dict:
    """Fit, then test, through HelloraCLI (the `python -m hellora_pl fit` machinery) in this process."""
    import torch

    torch.set_num_threads(spec["threads"])
    import pretrain_miniature

    from hellora_pl.adapters.sites import adapter_sites
    from hellora_pl.budget.counting import adapter_figures
    from hellora_pl.callbacks import RoutingProfilerCallback, RunSummary
    from hellora_pl.callbacks.injection import injection_callback
    from hellora_pl.cli import HelloraCLI
    from hellora_pl.module import HelloraModule

    started, cpu_started = time.perf_counter(), time.process_time()
    cli = HelloraCLI(
        HelloraModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"allow_abbrev": False, "exit_on_error": False},
        args=["--config", spec["config"]],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds, fit_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    summary = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RunSummary)).summary
    log_dir = cli.trainer.log_dir
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    test_seconds, test_cpu = time.perf_counter() - started - fit_seconds, time.process_time() - cpu_started - fit_cpu
    plan = injection_callback(cli.trainer).plan
    backbone = cli.model.model
    figures = adapter_figures(
        backbone,
        plan,
        adapter_sites(backbone, plan),
        _shares(plan),
        plan.rank,
        plan.dynamic_rank.rank_max if plan.dynamic_rank is not None else plan.rank,
    )
    after = pretrain_miniature.validation_losses(backbone, _windows(Path(spec["model"]), spec["windows"]))
    profiler = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RoutingProfilerCallback))
    drift = routing_drift_after_fit(plan, profiler.measure_routing(cli.trainer, cli.model), profiler.num_batches)
    return {
        # as the budget tool counts them: LoRI's B at its kept density, DR-LoRA at its full rank budget
        "trainable_params": figures["trainable"],
        "plan_trainable_params": plan.trainable_params,  # the plan's own count at the end of fit
        "adapter_flops_per_token": figures["flops"]["total"],
        "adapter_flops_by_part": {k: v for k, v in figures["flops"].items() if k != "total"},
        "adapted_selection_share": figures["flops"]["adapted_selection_share"],
        "hot_experts": [layer.hot_experts for layer in plan.layers],
        "policy": plan.policy,
        "tokens_per_s": _median_rate(log_dir),
        "tokens_per_s_overall": summary["tokens_per_s"],
        "train_tokens": summary["tokens"],
        "train_step_time_s": summary["train_step_time_s"],
        "final_train_loss": summary["metrics"].get("train/loss"),
        "final_val_loss": summary["metrics"].get("val/loss"),
        "test_metrics": {k: float(v) for k, v in tested.items()},
        "val_loss_after": after,
        "routing_drift": drift,
        "fit_seconds": round(fit_seconds, 1),  # wall: building the model and data, profile, liveness, steps, validation
        "test_seconds": round(test_seconds, 1),
        "fit_cpu_seconds": round(fit_cpu, 1),  # CPU time of every thread of the process
        "test_cpu_seconds": round(test_cpu, 1),
    }


def routing_drift_after_fit(plan, now, batches: int) -> dict | None:
    """How far fine-tuning moved the routing: the plan's profile (the base model on the first `batches`
    training batches) against `now`, the profiler's profile of the fine-tuned model on the same batches.
    Per layer and overall: the top-k hot set before and after (k = the model's top-k, HELLoRA's default)
    and their overlap |before & after| / k, and the share of selections on the run's adapted experts
    before and after. None when the plan has no routing counts (nothing was profiled)."""
    import torch

    from hellora_pl.routing import TopKPerLayer

    if not plan.layers or any(not layer.counts for layer in plan.layers):
        return None
    rows = {layer: row for row, layer in enumerate(now.layers)}
    policy = TopKPerLayer()
    layers = []
    for layer in plan.layers:
        before = torch.tensor(layer.counts, dtype=torch.float64)
        after = now.counts[rows[layer.layer]].double()
        before_mass = torch.tensor(layer.gate_mass, dtype=torch.float64) if layer.gate_mass else before
        hot_before = set(policy.select_layer(before, before_mass, now.top_k))
        hot_after = set(policy.select_layer(after, now.gate_mass[rows[layer.layer]].double(), now.top_k))
        adapted = sorted(layer.hot_experts)
        layers.append(
            {
                "layer": layer.layer,
                "hot_before": sorted(hot_before),
                "hot_after": sorted(hot_after),
                "hot_overlap": len(hot_before & hot_after) / len(hot_before),
                "adapted_share_before": float(before[adapted].sum() / before.sum()) if adapted else None,
                "adapted_share_after": float(after[adapted].sum() / after.sum()) if adapted else None,
            }
        )
    shares = [entry for entry in layers if entry["adapted_share_before"] is not None]
    return {
        "batches": batches,
        "tokens_after": now.tokens,
        "hot_overlap": statistics.fmean(entry["hot_overlap"] for entry in layers),
        "adapted_share_before": statistics.fmean(e["adapted_share_before"] for e in shares) if shares else None,
        "adapted_share_after": statistics.fmean(e["adapted_share_after"] for e in shares) if shares else None,
        "layers": layers,
    }


def _median_rate(log_dir: str) -> float:
    """The median over training steps of the module's `train/tokens_per_sec` (each step's tokens over its
    time): robust to the first step's liveness probe and to a shared machine's spikes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return statistics.median(event.value for event in events.Scalars("train/tokens_per_sec"))


def _shares(plan):
    """P(a selection of layer l goes to expert e) from the plan's routing profile (uniform without one)."""
    import torch

    counts = torch.tensor([layer.counts or [1] * plan.num_experts for layer in plan.layers], dtype=torch.float64)
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)


def launch(kind: str, spec: dict, folder: Path, threads: int) -> dict:
    """Run a worker in a process of its own; its output goes to `folder/log.txt`."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / f"{kind}_spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path = folder / f"{kind}_result.json"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (folder / "log.txt").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
        )
        # wait4: this child's own CPU time, right while other runs go on beside it (--jobs)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0 or not result_path.is_file():
        tail = "\n".join((folder / "log.txt").read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(
            f"{kind} run in {folder} failed (exit {code}); its log ends:\n{tail}\nfull log: {folder / 'log.txt'}"
        )
    result = json.loads(result_path.read_text())
    # the whole process (imports, loading, forgetting too): what the run costs on an idle core per thread
    result["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
    return result


def worker_main(kind: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if kind != "run":
        raise SystemExit(f"unknown worker kind {kind!r}")
    result = run_worker(spec)
    Path(spec_path).with_name(f"{kind}_result.json").write_text(json.dumps(result, indent=1))
    return 0


# -- aggregation and report ---------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def forgetting(run: dict, base: dict, task: str) -> dict:
    """Per domain: validation loss after fine-tuning minus before; `other`: the mean over the domains
    the task does not train on."""
    delta = {d: run["val_loss_after"][d] - base[d] for d in DOMAINS}
    others = [d for d in DOMAINS if d != OWN_DOMAIN[task]]
    return {**delta, "other": statistics.fmean(delta[d] for d in others)}


def aggregate(runs: dict, base: dict, tasks: list[str], methods: list[str]) -> list[dict]:
    """One row per task x method over its seeds, with ratios to LoRA's row of the same task."""
    rows = []
    for task in tasks:
        by_method = {}
        for method in methods:
            done = [r for r in runs.values() if r["task"] == task and r["method"] == method]
            if not done:
                continue
            row = {"task": task, "method": method, "seeds": sorted(r["seed"] for r in done)}
            for key in ("trainable_params", "adapter_flops_per_token", "tokens_per_s", "adapted_selection_share"):
                row[key], row[f"{key}_sd"] = mean_sd([r[key] for r in done])
            for metric, short in SCORES[task]:
                row[short], row[f"{short}_sd"] = mean_sd([r["test_metrics"].get(metric) for r in done])
            for key in DRIFT_KEYS:
                row[f"drift_{key}"], row[f"drift_{key}_sd"] = mean_sd(
                    [(r.get("routing_drift") or {}).get(key) for r in done]
                )
            changes = [forgetting(r, base, task) for r in done]
            for domain in (*DOMAINS, "other"):
                row[f"forgetting_{domain}"], row[f"forgetting_{domain}_sd"] = mean_sd([c[domain] for c in changes])
            by_method[method] = row
        lora = by_method.get("lora")
        for row in by_method.values():
            row["score"] = SCORES[task][0][1]
            if lora is not None:
                row["params_pct_of_lora"] = _pct(row["trainable_params"], lora["trainable_params"])
                row["flops_pct_of_lora"] = _pct(row["adapter_flops_per_token"], lora["adapter_flops_per_token"])
                row["throughput_vs_lora"] = _ratio(row["tokens_per_s"], lora["tokens_per_s"])
                for _, short in SCORES[task]:
                    row[f"{short}_minus_lora"] = _minus(row[short], lora[short])
            rows.append(row)
    return rows


ROUTING_REPORT = RESULTS_DIR / "miniature_routing.json"  # miniature_routing.py's report: each domain's hot set


def task_domain_overlap(runs: dict, model: str, report: Path = ROUTING_REPORT) -> dict | None:
    """Per task and seed, HELLoRA's hot set (from the task's own routing profile) against each pretraining
    domain's hot set in miniature_routing.py's report of the same model: the mean over layers of
    |task & domain| / k. None without that report."""
    if not report.is_file():
        return None
    routing = json.loads(report.read_text())
    if str(Path(routing["model"]).resolve()) != model:
        return None
    domains = routing["results"]["pretrained"]["hot"]
    overlap: dict = {}
    for run in runs.values():
        if run["method"] == "hellora":
            overlap.setdefault(run["task"], {})[str(run["seed"])] = {
                domain: statistics.fmean(len(set(a) & set(b)) / len(b) for a, b in zip(run["hot_experts"], sets))
                for domain, sets in domains.items()
            }
    return overlap


def overlap_lines(overlap: dict | None) -> str:
    if not overlap:
        return f"(needs hellora runs and {ROUTING_REPORT.name} of the same model: run benchmarks/miniature_routing.py)"
    lines = []
    for task, seeds in overlap.items():
        domains = sorted({d for by_domain in seeds.values() for d in by_domain})
        means = {d: statistics.fmean(by_domain[d] for by_domain in seeds.values()) for d in domains}
        lines.append(
            f"- {task}: HELLoRA's hot experts against each pretraining domain's hot set (mean over layers and "
            f"{len(seeds)} seeds): " + ", ".join(f"{d} {means[d]:.2f}" for d in domains) + "."
        )
    return "\n".join(lines)


DRIFT_KEYS = ("hot_overlap", "adapted_share_before", "adapted_share_after")


def drift_table(rows: list[dict]) -> str:
    lines = [
        [
            row["task"],
            row["method"],
            _pm(row["drift_hot_overlap"], row["drift_hot_overlap_sd"], 2),
            _pm(row["drift_adapted_share_before"], row["drift_adapted_share_before_sd"], 3),
            _pm(row["drift_adapted_share_after"], row["drift_adapted_share_after_sd"], 3),
        ]
        for row in rows
    ]
    headers = (
        "task",
        "method",
        "top-k hot set after vs before: overlap",
        "selections on adapted experts, before",
        "after",
    )
    return markdown_table(headers, lines)


def _pct(a, b):
    return None if a is None or not b else 100.0 * a / b


def _ratio(a, b):
    return None if a is None or not b else a / b


def _minus(a, b):
    return None if a is None or b is None else a - b


def _pm(mean, sd, digits=3, scale=1.0):
    if mean is None:
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {sd * scale:.{digits}f}" if sd is not None else "")


def _opt(value, fmt):
    return "n/a" if value is None else format(value, fmt)


TABLE_HEADERS = (
    "task", "method", "seeds", "trainable params", "params % of LoRA", "adapter FLOPs/token", "FLOPs % of LoRA",
    "train tokens/s", "x LoRA", "score", "mean ± sd", "vs LoRA", "second score", "mean ± sd",
    "forgetting: val loss change, other domains",
)  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        scores = SCORES[row["task"]]
        second = scores[1][1] if len(scores) > 1 else None
        lines.append(
            [
                row["task"],
                row["method"],
                len(row["seeds"]),
                f"{row['trainable_params']:,.0f}",
                _opt(row.get("params_pct_of_lora"), ".1f"),
                f"{row['adapter_flops_per_token']:,.0f}",
                _opt(row.get("flops_pct_of_lora"), ".1f"),
                _opt(row["tokens_per_s"], ",.0f"),
                _opt(row.get("throughput_vs_lora"), ".2f"),
                scores[0][1],
                _pm(row[scores[0][1]], row[f"{scores[0][1]}_sd"]),
                _opt(row.get(f"{scores[0][1]}_minus_lora"), "+.3f"),
                second or "",
                _pm(row[second], row[f"{second}_sd"]) if second else "",
                _pm(row["forgetting_other"], row["forgetting_other_sd"], 4),
            ]
        )
    return markdown_table(TABLE_HEADERS, lines)


def verdict(row: dict, other: dict) -> str:
    """Whether `row`'s task score beats `other`'s beyond the seeds' spread (both standard deviations)."""
    score = row["score"]
    if row.get(score) is None or other.get(score) is None:
        return "not measured"
    if len(row["seeds"]) < 2 or len(other["seeds"]) < 2:
        return "one seed: no verdict"
    delta = row[score] - other[score]
    noise = math.hypot(row[f"{score}_sd"] or 0.0, other[f"{score}_sd"] or 0.0)
    if delta > noise:
        return "higher, beyond the seeds' spread"
    if delta < -noise:
        return "lower, beyond the seeds' spread"
    return "no difference beyond the seeds' spread"


def _points(row: dict, other: dict) -> str:
    score = row["score"]
    if row.get(score) is None or other.get(score) is None:
        return "n/a"
    delta = row[score] - other[score]
    relative = f", {100 * delta / other[score]:+.0f}% relative" if other[score] else ""
    return f"{100 * delta:+.1f} points{relative}"


def claims(rows: list[dict]) -> list[str]:
    """HELLoRA against LoRA, task by task, beside the paper's OLMoE figures; the verdicts are mechanical."""
    out = []
    for row in rows:
        if row["method"] != "hellora" or row.get("params_pct_of_lora") is None:
            continue
        lora = next(r for r in rows if r["task"] == row["task"] and r["method"] == "lora")
        out.append(
            f"- {row['task']}: HELLoRA trains {row['params_pct_of_lora']:.1f}% of LoRA's parameters "
            f"(paper: {PAPER['params_pct']}%), {row['flops_pct_of_lora'] - 100.0:+.1f}% adapter FLOPs per token "
            f"(paper: {PAPER['flops_change_pct']}%), {_opt(row.get('throughput_vs_lora'), '.2f')}x LoRA's training "
            f"tokens/s (paper: {PAPER['throughput_ratio']}x); {row['score']} {_points(row, lora)} against LoRA "
            f"(paper: +{PAPER['accuracy_change_pct']}% accuracy): {verdict(row, lora)}."
        )
    return out


def control_lines(rows: list[dict]) -> list[str]:
    """HELLoRA's hot experts against the same number of random or least-used ones, and against MoE-Sieve."""
    out = []
    for row in rows:
        if row["method"] != "hellora":
            continue
        for name, label in (
            ("random_experts", "random experts"),
            ("least_used", "the least-used experts"),
            ("moe_sieve", "MoE-Sieve (top 25%)"),
        ):
            other = next((r for r in rows if r["task"] == row["task"] and r["method"] == name), None)
            if other is None:
                continue
            share = f"{100 * row['adapted_selection_share']:.0f}% vs {100 * other['adapted_selection_share']:.0f}%"
            out.append(
                f"- {row['task']}: HELLoRA against {label}: {row['score']} {_points(row, other)} "
                f"({verdict(row, other)}); share of routed selections on adapted experts {share}."
            )
    return out


def _shown(path: str) -> str:
    """A path inside the repository as a relative one."""
    return str(Path(path).relative_to(REPO)) if Path(path).is_relative_to(REPO) else path


def _cost(runs: dict) -> str:
    """What the runs cost, whichever commands made them (the Machine section names only the last)."""
    cpu = sum(r["cpu_seconds"] for r in runs.values())
    wall = sum(r["wall_seconds"] for r in runs.values())
    return (
        f"{len(runs)} runs, each in its own process: {cpu:,.0f} CPU seconds in all ({cpu / 3600:.2f} h; "
        f"{cpu / max(len(runs), 1):.0f} s a run), {wall:,.0f} s of wall time summed over runs (runs side by side, "
        "with --jobs, take less wall time in all)."
    )


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    budget = payload["settings"]["budget"]
    base = payload["base"]["val_loss"]
    return "\n\n".join(
        [
            "# The paper's claims in miniature",
            f"Every method fine-tuned from `{_shown(payload['settings']['model'])}` (seeds: mean ± sample standard deviation); "
            f"{', '.join(f'{t} {n}' for t, n in (budget['steps'] or STEPS).items())} steps of {budget['batch_size']} examples, rank {budget['rank']}, learning rate "
            f"{', '.join(f'{t} {n}' for t, n in (budget['learning_rate'] or LEARNING_RATE).items())} "
            f"(ESFT x{budget['esft_lr_scale']}); held-out problems per benchmark "
            f"({', '.join(f'{t} {n}' for t, n in (budget['eval_limit'] or EVAL_LIMIT).items())}; safety: that many "
            "harmful and that many benign instructions). Adapter FLOPs are forward FLOPs per token "
            "from each run's measured routing profile; tokens/s is the median over training steps of each step's tokens over its time, on a shared CPU. Forgetting: "
            "validation loss on the pretraining domains the task does not train on, after minus before "
            f"(before: {', '.join(f'{d} {v:.4f}' for d, v in base.items())}).",
            table(rows),
            _cost(payload["runs"]),
            "## Which experts each task is routed to",
            "The hot set HELLoRA chose for each task (k = 4 of 32 per layer), against the hot sets of the "
            f"miniature's pretraining domains in `{ROUTING_REPORT.name}` (1.0: the same experts in every layer; "
            "two random sets of 4 of 32 share 0.125 on average).",
            overlap_lines(payload.get("task_domain_overlap")),
            "## Routing drift during fine-tuning",
            "Per run, the routing of the fine-tuned model on the task's first training batches against the plan's "
            "profile of the base model (`routing_drift` in the JSON, per layer too): the overlap of the top-k "
            "(the model's top-k per layer) hot sets, and the share of routed selections on the experts the run "
            "adapted (n/a: no expert adapters).",
            drift_table(rows),
            "## HELLoRA against LoRA, beside the paper (OLMoE-1B-7B)",
            "\n".join(claims(rows)) or "(needs both lora and hellora runs)",
            "## HELLoRA's choice of experts against the controls",
            "\n".join(control_lines(rows)) or "(needs hellora and a control: random_experts, least_used or moe_sieve)",
            "## Machine",
            machine_markdown(payload["machine"]),
        ]
    )


# -- the study -------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK", help=f"of {', '.join(TASKS)}")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), metavar="METHOD", help=f"of {', '.join(METHODS)}"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--steps", type=int, default=None, help=f"training steps of every run (default per task: {STEPS})"
    )
    parser.add_argument(
        "--learning-rate", type=float, default=None, help=f"of every run but ESFT's (default per task: {LEARNING_RATE})"
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a folder written by pretrain_miniature.py")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where miniature_study.json and .md go")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="run folders and task data (default runs/miniature_study, or <out>/work with --smoke)",
    )
    parser.add_argument(
        "--safety-data", type=Path, default=DEFAULT_SAFETY, help=f"folder holding {SAFETY_TRAIN} and {SAFETY_HARMFUL}"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default 2; 1 with --smoke)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at the same time, each in its own process (give each its own cores: jobs x threads <= cores)",
    )
    parser.add_argument("--smoke", action="store_true", help="a CI-sized run: a few steps, a few problems")
    args = parser.parse_args(argv)
    errors = []
    for name, given, known in (("--tasks", args.tasks, TASKS), ("--methods", args.methods, METHODS)):
        unknown = [x for x in given if x not in known]
        if unknown:
            errors.append(f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        if len(set(given)) != len(given):
            errors.append(f"{name} lists a name twice: {' '.join(given)}")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        errors.append(f"--seeds must be distinct integers >= 0, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        errors.append(f"--steps must be >= 1, got {args.steps}")
    if args.learning_rate is not None and not 0 < args.learning_rate < 1:
        errors.append(f"--learning-rate must be in (0, 1), got {args.learning_rate}")
    if args.jobs < 1:
        errors.append(f"--jobs must be >= 1, got {args.jobs}")
    if args.threads is not None and args.threads < 1:
        errors.append(f"--threads must be >= 1, got {args.threads}")
    missing = [f for f in MODEL_FILES if not (args.model / f).is_file()]
    if missing:
        errors.append(
            f"--model {args.model} lacks {', '.join(missing)}: give a folder written by benchmarks/pretrain_miniature.py "
            f"(the shipped one is {DEFAULT_MODEL.relative_to(REPO)})"
        )
    if "safety" in args.tasks:
        absent = [f for f in (SAFETY_TRAIN, SAFETY_HARMFUL) if not (args.safety_data / f).is_file()]
        if absent:
            errors.append(
                f"the safety task reads {', '.join(absent)} from --safety-data {args.safety_data}, which lacks it "
                "(the refusal pairs of ../shared/data/safety); point --safety-data at that folder or drop safety from --tasks"
            )
    if errors:
        parser.error("; ".join(errors))
    budget = SMOKE if args.smoke else Budget()
    if args.steps is not None:
        budget = replace(budget, steps=dict.fromkeys(TASKS, args.steps))
    if args.learning_rate is not None:
        budget = replace(budget, learning_rate=dict.fromkeys(TASKS, args.learning_rate))
    budget = replace(budget, threads=args.threads or budget.threads)
    args.work = args.work or (args.out / "work" if args.smoke else DEFAULT_WORK)
    return args, budget


def fingerprint(model: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "val_tokens.safetensors"):
        digest.update((model / name).read_bytes())
    return digest.hexdigest()[:16]


def settings_of(args, budget: Budget) -> dict:
    return {
        "model": str(args.model.resolve()),
        "model_sha256": fingerprint(args.model),
        "smoke": args.smoke,
        "budget": asdict(budget),
    }


def load_results(path: Path, settings: dict) -> dict:
    """The results so far; refused when they were made with other settings (mixing them would mislead)."""
    if not path.is_file():
        return {"settings": settings, "base": None, "runs": {}}
    payload = json.loads(path.read_text())
    if payload.get("settings") != settings:
        theirs = payload.get("settings") or {}
        differ = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
        raise SystemExit(
            f"{path} holds results made with other settings ({', '.join(differ)} differ); give another --out to "
            "start a study with these settings, or the same options to resume that one."
        )
    return payload


def save(path_dir: Path, payload: dict) -> None:
    """The JSON and the table of every run so far (all tasks and methods done, not only this command's)."""
    done_tasks = [t for t in TASKS if any(r["task"] == t for r in payload["runs"].values())]
    done_methods = [m for m in METHODS if any(r["method"] == m for r in payload["runs"].values())]
    payload["rows"] = aggregate(payload["runs"], payload["base"]["val_loss"], done_tasks, done_methods)
    payload["task_domain_overlap"] = task_domain_overlap(payload["runs"], payload["settings"]["model"])
    write_results(path_dir, STEM, payload, markdown(payload))


def main(argv=None) -> int:
    args, budget = parse_args(argv)
    load_at_start = load_average()
    settings = settings_of(args, budget)
    json_path = args.out / f"{STEM}.json"
    payload = load_results(json_path, settings)
    files = prepare_data(args.work, budget, args.safety_data, args.tasks)
    if payload["base"] is None:
        spec = {"model": str(args.model.resolve()), "windows": budget.windows, "threads": budget.threads}
        payload["base"] = base_losses(spec)  # here: nothing trains, nothing to isolate
    todo = [(t, m, s) for t in args.tasks for m in args.methods for s in args.seeds]
    started = time.monotonic()
    pending = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for number, (task, method, seed) in enumerate(todo, 1):
            key = f"{task}/{method}/{seed}"
            if key in payload["runs"]:
                print(f"[{number}/{len(todo)}] {key}: kept from an earlier run", flush=True)
                continue
            spec = prepare_run(args, budget, files, task, method, seed)
            pending[pool.submit(timed_launch, spec, budget.threads)] = (number, key, task, method, seed)
        while pending:  # results are saved here, one at a time, as runs finish
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                number, key, task, method, seed = pending.pop(future)
                try:
                    result = future.result()
                except (
                    BaseException
                ):  # a failed run stops the study (SystemExit naming its log): queued runs never start
                    for queued in pending:
                        queued.cancel()
                    raise
                result.update(task=task, method=method, seed=seed)
                payload["runs"][key] = result
                payload["machine"] = _machine(argv, load_at_start)
                save(args.out, payload)
                score = SCORES[task][0]
                print(
                    f"[{number}/{len(todo)}] {key}: {score[1]} {result['test_metrics'].get(score[0], float('nan')):.3f}, "
                    f"{result['trainable_params']:,} params, {result['tokens_per_s']:.0f} tokens/s, "
                    f"{result['wall_seconds']:.0f} s",
                    flush=True,
                )
    payload["machine"] = _machine(argv, load_at_start)
    save(args.out, payload)
    print(f"wrote {json_path} and {json_path.with_suffix('.md')} ({time.monotonic() - started:.0f} s)", flush=True)
    return 0


def prepare_run(args, budget: Budget, files: dict, task: str, method: str, seed: int) -> dict:
    """A fresh run folder with the run's `config.yaml`; the worker's spec."""
    import yaml

    run_dir = args.work / "runs" / task / method / f"seed{seed}"
    if run_dir.exists():  # what an unfinished run left (its results are not in the JSON): start it afresh
        shutil.rmtree(run_dir)
    config = run_config(task, method, seed, files[task], args.model.resolve(), budget, run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    return {
        "config": str(run_dir / "config.yaml"),
        "model": str(args.model.resolve()),
        "windows": budget.windows,
        "threads": budget.threads,
    }


def timed_launch(spec: dict, threads: int) -> dict:
    started = time.monotonic()
    result = launch("run", spec, Path(spec["config"]).parent, threads)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def _plain(value):
    """Paths as strings, for YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _machine(argv, load_at_start) -> dict:
    import torch
    from _common import machine_info

    info = machine_info(torch.device("cpu"), __file__, argv, load_at_start)
    info["torch_threads"] = None  # the runs set their own (settings.budget.threads)
    return info


if __name__ == "__main__":
    if sys.argv[1:2] == ["--_worker"]:
        raise SystemExit(worker_main(sys.argv[2], sys.argv[3]))
    raise SystemExit(main())
