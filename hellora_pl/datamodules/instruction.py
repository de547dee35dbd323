"""The shared machinery of the task datamodules: instruction/response training data and a benchmark.

Subclasses say where their training rows come from (`_training_examples`) and which benchmark
they are judged on (`_eval_task`). This class renders prompts (chat template or plain),
tokenizes through `datasets` (cached), holds out a validation split, packs on request, and
serves three kinds of batches: training, validation loss, and prompts to generate from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import datasets
import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from hellora_pl.datamodules.collate import PromptCollator
from hellora_pl.datamodules.encoding import EncodingStats, encode_rows, encode_source, pack_examples
from hellora_pl.datamodules.formats import ALPACA_TEMPLATE, PromptTemplate, RecordFormat, TemplateChoice
from hellora_pl.datamodules.loaders import LossLoaders
from hellora_pl.datamodules.sources import DataSource
from hellora_pl.datamodules.tokenizer import load_tokenizer
from hellora_pl.evaluation.generation import GenerationConfig
from hellora_pl.evaluation.tasks import EvalTask


class InstructionDataModule(LossLoaders, L.LightningDataModule):
    """Base of MathDataModule, CodeDataModule and SafetyDataModule.

    Args (shared by all three):
        tokenizer: hub id, local folder or "builtin:char".
        max_length: tokens per training example; longer ones are cut (counted and logged).
        template: "auto" uses the tokenizer's chat template when it has one, else `plain_template`.
        plain_template: text with "{prompt}"; None takes the task's default.
        system_prompt: a system message (chat) or a first paragraph (plain).
        packing: concatenate whole examples up to `max_length` (attention stays within each).
        val_size: held-out share (< 1) or count (>= 1) of the training rows for `val/loss`; 0 for none.
        batch_size, eval_batch_size: training and generation batch sizes.
        seed: shuffling and the validation split.
        generation: how completions are generated for the benchmark.
        eval_limit: evaluate on the first N benchmark problems only (None: all); a benchmark of two
            sets (safety's harmful and benign prompts) takes the first N of each.
        evaluate_in_validation: also run the benchmark at every validation (else only in `test`).
    """

    default_plain_template = ALPACA_TEMPLATE

    def __init__(
        self,
        tokenizer: str,
        max_length: int = 1024,
        template: TemplateChoice = "auto",
        plain_template: str | None = None,
        system_prompt: str | None = None,
        packing: bool = False,
        val_size: float = 0.02,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        generation: GenerationConfig | None = None,
        eval_limit: int | None = None,
        evaluate_in_validation: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("max_length", max_length),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0 (a share below 1 or a count), got {val_size}.")
        if eval_limit is not None and eval_limit < 1:
            raise ValueError(f"eval_limit must be a positive number of problems or null, got {eval_limit}.")
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.template_choice = template
        self.plain_template = plain_template or self.default_plain_template
        self.system_prompt = system_prompt
        self.packing = packing
        self.val_size = val_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.generation = generation or GenerationConfig()
        self.eval_limit = eval_limit
        self.evaluate_in_validation = evaluate_in_validation
        self.stats: dict[str, EncodingStats] = {}
        self.eval_task: EvalTask | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._train: list[dict[str, Any]] | None = None
        self._val: list[dict[str, Any]] = []
        self._prompts: list[dict[str, Any]] = []

    # -- what subclasses provide ----------------------------------------------------------
    def _training_examples(self) -> datasets.Dataset:
        """Tokenized training examples (`input_ids`, `labels`, `truncated`); use `self.encode`."""
        raise NotImplementedError

    def _eval_task(self) -> EvalTask | None:
        """The benchmark this task is judged on, or None."""
        return None

    # -- shared machinery -------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def template(self) -> PromptTemplate:
        return PromptTemplate(self.tokenizer, self.template_choice, self.plain_template, self.system_prompt)

    def encode(self, source: DataSource, fmt: RecordFormat, split: str) -> datasets.Dataset:
        """Tokenized examples of `source`; what was cut or skipped is logged under `split`."""
        return self._record(split, *encode_source(source, fmt, self.template, self.max_length))

    def encode_rows(
        self, rows: datasets.Dataset, source: DataSource, fmt: RecordFormat, split: str
    ) -> datasets.Dataset:
        """As `encode`, for rows a subclass read itself."""
        return self._record(split, *encode_rows(rows, source, fmt, self.template, self.max_length))

    def _record(self, split: str, examples: datasets.Dataset, stats: EncodingStats) -> datasets.Dataset:
        self.stats[split] = stats
        rank_zero_info(f"[hellora_pl] {stats.summary(split, self.max_length)}")
        return examples

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self._train is None:
            self._split_train_val(self._training_examples())
        needs_benchmark = stage in ("test", "predict", None) or self.evaluate_in_validation
        if needs_benchmark and self.eval_task is None:
            self._prepare_benchmark()
        self._log_stats()

    def _split_train_val(self, examples: datasets.Dataset) -> None:
        count = int(round(self.val_size * len(examples))) if self.val_size < 1 else int(self.val_size)
        if count >= len(examples):
            raise ValueError(f"val_size {self.val_size} leaves no training examples out of {len(examples)}.")
        order = examples.shuffle(seed=self.seed)  # seeded; the held-out rows never train
        train = order.select(range(count, len(order)))
        val = order.select(range(count))
        self._train = pack_examples(train, self.max_length) if self.packing else train.remove_columns("truncated")
        self._val = val.remove_columns("truncated") if count else []

    def _prepare_benchmark(self) -> None:
        task = self._eval_task()
        if task is None:
            return
        if self.generation.stop is None:
            self.generation = dataclasses.replace(self.generation, stop=list(task.default_stop))
        evaluated = task.evaluated(self.eval_limit)
        template = self.template
        self._prompts = []
        for index in evaluated:
            text = template.prompt(task.instruction(index)) if task.templated else task.instruction(index)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._prompts.append({"prompt_ids": ids, "problem_index": index})
        self.eval_task = task
        rank_zero_info(f"[hellora_pl] benchmark {task.name}: {len(evaluated)} of {len(task)} problems")

    def _log_stats(self) -> None:
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is None or not self.stats:
            return
        metrics = {}
        for split, stats in self.stats.items():
            metrics[f"data/{split}_rows"] = stats.rows
            metrics[f"data/{split}_truncated"] = stats.truncated
            metrics[f"data/{split}_skipped"] = sum(stats.skipped.values())
        logger.log_metrics(metrics, step=0)

    # -- loaders -------------------------------------------------------------------------------
    def _generation_loader(self) -> DataLoader:
        sampler = None
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if world_size > 1:  # each problem on exactly one rank, so summed metrics count it once
            sampler = UnrepeatedDistributedSampler(
                self._prompts, num_replicas=world_size, rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(
            self._prompts,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            collate_fn=PromptCollator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        if self._train is None:
            raise RuntimeError("call setup('fit') before requesting the training dataloader")
        return self._loss_loader(self._train, shuffle=True)

    def val_dataloader(self):
        loaders = [self._loss_loader(self._val, shuffle=False)] if len(self._val) else []
        if self.evaluate_in_validation and self._prompts:
            loaders.append(self._generation_loader())
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self):
        if not self._prompts:
            raise RuntimeError(f"{type(self).__name__} has no benchmark to test on; configure its evaluation set.")
        return self._generation_loader()
