"""Math word problems: GSM8K or MetaMathQA for training, GSM8K test for accuracy."""

from __future__ import annotations

from typing import Literal

import datasets

from hellora_pl.datamodules.formats import QUESTION_TEMPLATE, record_format
from hellora_pl.datamodules.instruction import InstructionDataModule
from hellora_pl.datamodules.paths import BENCHMARK, TRAINING, present
from hellora_pl.datamodules.sources import DataSource, check_columns, load_source
from hellora_pl.evaluation.tasks import MathTask


class MathDataModule(InstructionDataModule):
    """Trains on `train` (`format` gsm8k: question/answer; metamathqa: query/response) and is
    judged by GSM8K accuracy, strict and flexible, on `benchmark` (GSM8K test format:
    question/answer ending in `#### N`; map other column names with `fields`).

    The rest of the arguments are InstructionDataModule's.
    """

    default_plain_template = QUESTION_TEMPLATE

    def __init__(
        self,
        train: DataSource | None = None,
        format: Literal["gsm8k", "metamathqa"] = "gsm8k",
        benchmark: DataSource | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.train_source = train
        self.format = record_format(format, ("gsm8k", "metamathqa"))
        self.benchmark = benchmark

    def data_paths(self) -> list[tuple[str, str, str]]:
        """(role, config key, path) of the data this module reads; see `paths.check_data_files`."""
        return present([
            (TRAINING, "train.path", self.train_source and self.train_source.path),
            (BENCHMARK, "benchmark.path", self.benchmark and self.benchmark.path),
        ])  # fmt: skip

    def _training_examples(self) -> datasets.Dataset:
        if self.train_source is None:
            raise ValueError("MathDataModule needs `train:` (a DataSource) to fit or validate.")
        return self.encode(self.train_source, self.format, "train")

    def _eval_task(self) -> MathTask | None:
        if self.benchmark is None:
            return None
        rows = load_source(self.benchmark)
        check_columns(rows, self.benchmark, ("question", "answer"))
        problems = [
            {"question": row[self.benchmark.column("question")], "answer": row[self.benchmark.column("answer")]}
            for row in rows
        ]
        return MathTask(problems)
