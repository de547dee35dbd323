"""Runs a benchmark inside Lightning's validate/test loops: generate, score, gather, log, save.

An `nn.Module` so its torchmetrics metrics (one per stage) move with the LightningModule and
reduce across processes. Per-sample records go to JSONL in the log dir, one file per rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from hellora_pl.evaluation.generation import GenerationConfig, generate_completions
from hellora_pl.evaluation.tasks import EvalTask, Record


class BenchmarkRunner(nn.Module):
    def __init__(
        self,
        task: EvalTask,
        generation: GenerationConfig,
        tokenizer: PreTrainedTokenizerBase,
        stages: tuple[str, ...] = ("test",),
    ):
        """`stages`: where the benchmark runs ("val" too when it runs at every validation); the same
        on every rank, so all ranks take part in reducing the metric."""
        super().__init__()
        if tokenizer is None:
            raise ValueError("A benchmark needs the datamodule's tokenizer to decode completions.")
        self.task = task
        self.stages = stages
        self.generation = generation
        self.tokenizer = tokenizer
        self.metrics = nn.ModuleDict({stage: task.new_metric() for stage in ("val", "test")})
        self.records: dict[str, list[Record]] = {"val": [], "test": []}

    def step(self, model, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        indices = list(batch["problem_index"])
        completions = generate_completions(
            model,
            self.tokenizer,
            batch["prompt_ids"],
            batch["prompt_attention_mask"],
            self.generation,
            batch_seed=indices[0] if indices else batch_idx,
        )
        records = self.task.score(indices, completions)
        self.task.update(self.metrics[stage], records)
        self.records[stage].extend(records)

    def finish(self, stage: str, trainer) -> dict[str, torch.Tensor]:
        """The stage's metric values (reduced across ranks; every rank must call) and the JSONL written."""
        metric, records = self.metrics[stage], self.records[stage]
        self.records[stage] = []
        if trainer.sanity_checking or stage not in self.stages:
            metric.reset()
            return {}
        values = metric.compute()
        metric.reset()
        self._save(records, stage, trainer)
        return {f"{stage}/{self.task.name}/{key}": value for key, value in values.items()}

    def _save(self, records: list[Record], stage: str, trainer) -> Path | None:
        root = trainer.log_dir or trainer.default_root_dir
        rank = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = _unused(Path(root) / "generations" / f"{stage}_{self.task.name}_step{trainer.global_step}{rank}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as handle:  # "x": never overwrite an earlier evaluation
            for record in sorted(records, key=lambda r: r["index"]):
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return path


def _unused(path: Path) -> Path:
    candidate, number = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
        number += 1
    return candidate
