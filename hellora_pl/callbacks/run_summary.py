"""RunSummary: what a fit produced and what to run next, printed and written as summary.json."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from ..adapters import ADAPTER_FILE, PLAN_FILE
from .cli_commands import export_command, rerun_command
from .injection import injection_callback
from .interrupt import InterruptCheckpoint


class RunSummary(Callback):
    """At the end of fit, rank 0 prints a short summary and writes it as `<log dir>/<filename>`
    (not under `fast_dev_run`, which writes nothing permanent).

    It holds: how the run ended (finished, or stopped by InterruptCheckpoint and where), global
    steps, wall time (from this callback's `setup`, so put it before the injection callback to
    count the routing profile too), tokens/s (the attention-mask tokens of every training batch
    on every rank, over the summed time of the training steps of this process: fetching data and
    validation are excluded), the plan and adapter files of the HotExpertInjectionCallback if
    there is one, the best and last checkpoints of the first ModelCheckpoint, the final
    `train/loss` and every `val/*` and `test/*` metric, and the commands to resume, test and
    export. Commands repeat this process's `python -m hellora_pl fit` arguments; when it was
    not launched that way the Python forms are given instead. With several callbacks of this
    type, only the first acts.
    """

    def __init__(self, filename: str = "summary.json"):
        if Path(filename).name != filename or not filename.endswith(".json"):
            raise ValueError(
                f"RunSummary(filename={filename!r}): give a file name ending in .json, without folders "
                "(it goes into the trainer's log dir), e.g. 'summary.json'."
            )
        self.filename = filename
        self.summary: dict | None = None  # the last fit's summary, on every rank
        self._acts = True
        self._reset()

    def _reset(self) -> None:
        self._started = time.perf_counter()
        self._start_step = 0
        self._batch_started: float | None = None
        self._train_seconds = 0.0
        self._tokens = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._acts = next(cb for cb in trainer.callbacks if isinstance(cb, RunSummary)) is self
        if stage == "fit":
            self._reset()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self._batch_started is None:
            return
        self._train_seconds += time.perf_counter() - self._batch_started
        self._batch_started = None
        self._tokens += batch_tokens(batch)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._acts:
            return
        self.summary = self._collect(trainer)  # on every rank: log_dir and the token count are collectives
        if not trainer.is_global_zero:
            return
        if not trainer.fast_dev_run:
            path = Path(self.summary["log_dir"], self.filename)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.summary, indent=2) + "\n")
            self.summary["summary_path"] = str(path)
        rank_zero_info(format_summary(self.summary))

    def _collect(self, trainer: Trainer) -> dict:
        tokens = trainer.strategy.reduce(
            torch.tensor(self._tokens, dtype=torch.long, device=trainer.strategy.root_device), reduce_op="sum"
        )
        tokens = int(tokens)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir).absolute()
        summary = {
            "status": "finished",
            "global_step": trainer.global_step,
            "steps_this_run": trainer.global_step - self._start_step,
            "wall_time_s": round(time.perf_counter() - self._started, 3),
            "train_step_time_s": round(self._train_seconds, 3),
            "tokens": tokens,
            "tokens_per_s": round(tokens / self._train_seconds, 1) if self._train_seconds > 0 else None,
            "log_dir": str(log_dir),
            "metrics": final_metrics(trainer),
            **_plan_files(trainer),
            **_checkpoints(trainer),
        }
        interrupt = next((cb for cb in trainer.callbacks if isinstance(cb, InterruptCheckpoint)), None)
        if interrupt is not None and interrupt.interrupted:
            signal_name = interrupt.received.name if interrupt.received is not None else "a signal on another rank"
            summary["status"] = f"interrupted by {signal_name}"
            summary["interrupted_checkpoint"] = str(interrupt.checkpoint_path) if interrupt.checkpoint_path else None
        summary["commands"] = _commands(summary, log_dir)
        return summary


def batch_tokens(batch) -> int:
    """Tokens in a training batch: the attention mask's ones, or every input id where there is no mask."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    return int(ids.numel()) if ids is not None else 0


def final_metrics(trainer: Trainer) -> dict[str, float]:
    """The last values of train/loss and of every val/* and test/* metric the trainer holds."""
    metrics = {}
    for name, value in sorted(trainer.callback_metrics.items()):
        if name == "train/loss" or name.startswith(("val/", "test/")):
            metrics[name] = float(value)
    return metrics


def _plan_files(trainer: Trainer) -> dict:
    try:
        injection = injection_callback(trainer)
    except ValueError:  # a run without hellora adapters still gets a summary
        return {"plan": None, "adapters": None}
    directory = injection.directory(trainer).absolute()
    plan = injection.plan
    return {
        "plan": str(directory / PLAN_FILE) if (directory / PLAN_FILE).exists() else None,
        "adapters": str(directory / ADAPTER_FILE) if (directory / ADAPTER_FILE).exists() else None,
        "method": plan.method if plan is not None else None,
        "trainable_params": plan.trainable_params if plan is not None else None,
    }


def _checkpoints(trainer: Trainer) -> dict:
    checkpoint = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
    if checkpoint is None:
        return {"best_checkpoint": None, "last_checkpoint": None}
    score = checkpoint.best_model_score
    return {
        "best_checkpoint": _absolute(checkpoint.best_model_path),
        "best_score": float(score) if score is not None and math.isfinite(float(score)) else None,
        "monitor": checkpoint.monitor,
        "last_checkpoint": _absolute(checkpoint.last_model_path),
    }


def _absolute(path: str) -> str | None:
    return str(Path(path).absolute()) if path else None


def _commands(summary: dict, log_dir: Path) -> dict:
    resume_from = summary.get("interrupted_checkpoint") or summary["last_checkpoint"]
    best = summary["best_checkpoint"] or summary["last_checkpoint"]
    commands = {
        "resume": _command_or_python("fit", resume_from, "trainer.fit(model, datamodule, ckpt_path={!r})"),
        "test": _command_or_python("test", best, "trainer.test(model, datamodule, ckpt_path={!r})"),
    }
    adapters = Path(summary["adapters"]).parent if summary.get("adapters") else None
    for fmt in ("peft", "merged"):
        commands[f"export_{fmt}"] = export_command(fmt, log_dir / "export" / fmt, ckpt_path=best, adapter_path=adapters)
    return commands


def _command_or_python(subcommand: str, ckpt_path: str | None, python_form: str) -> str | None:
    if ckpt_path is None:
        return None
    return rerun_command(subcommand, ckpt_path) or python_form.format(ckpt_path)


def format_summary(summary: dict) -> str:
    """A short readable block of the summary (about a dozen lines)."""
    tokens_per_s = f"{summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else "no training steps"
    lines = [
        "[hellora] ---- run summary ----",
        f"  {summary['status']}: global step {summary['global_step']} ({summary['steps_this_run']} in this run), "
        f"{summary['wall_time_s']:.1f} s wall, {tokens_per_s} over {summary['train_step_time_s']:.1f} s of steps",
    ]
    if summary.get("method"):
        lines.append(f"  method {summary['method']}, {summary['trainable_params']:,} trainable adapter parameters")
    lines.append(f"  plan      {summary['plan'] or '-'}")
    lines.append(f"  adapters  {summary['adapters'] or '-'}")
    best = summary["best_checkpoint"] or "-"
    if summary.get("best_score") is not None:
        best += f"  ({summary['monitor']} {summary['best_score']:.4f})"
    lines.append(f"  best      {best}")
    lines.append(f"  last      {summary['last_checkpoint'] or '-'}")
    if summary.get("interrupted_checkpoint"):
        lines.append(f"  interrupted  {summary['interrupted_checkpoint']}")
    if summary["metrics"]:
        lines.append("  metrics   " + "  ".join(f"{name} {value:.4g}" for name, value in summary["metrics"].items()))
    labels = {"resume": "resume", "test": "test", "export_peft": "export", "export_merged": "export"}
    for key, label in labels.items():
        if summary["commands"].get(key):
            lines.append(f"  {label:<9} {summary['commands'][key]}")
    if summary.get("summary_path"):
        lines.append(f"  summary   {summary['summary_path']}")
    return "\n".join(lines)
