"""Safety: refusal pairs, optionally mixed with general instructions (as Saferpaca does), judged by refusal rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import datasets

from hellora_pl.datamodules.formats import record_format
from hellora_pl.datamodules.instruction import InstructionDataModule
from hellora_pl.datamodules.paths import BENCHMARK, TRAINING, DataPath, present, require_exists
from hellora_pl.datamodules.sources import DataSource
from hellora_pl.evaluation.refusal import load_harmful_prompts
from hellora_pl.evaluation.tasks import RefusalTask

Judge = Callable[[list[str], list[str]], list[bool]]


def mixture_sizes(safety: int, general: int, safety_fraction: float | None) -> tuple[int, int]:
    """How many safety and general examples to keep so safety is `safety_fraction` of the mix.

    The larger side is subsampled; nothing is repeated. None keeps both whole.
    """
    if safety_fraction is None or general == 0:
        return safety, general
    if not 0 < safety_fraction < 1:
        raise ValueError(f"safety_fraction must be in (0, 1), got {safety_fraction}.")
    if safety / (safety + general) > safety_fraction:
        return max(1, round(safety_fraction * general / (1 - safety_fraction))), general
    return safety, max(1, round(safety * (1 - safety_fraction) / safety_fraction))


class SafetyDataModule(InstructionDataModule):
    """Trains on refusal pairs `train` (Alpaca format: instruction, optional input, output), mixed
    with `general` instructions when given so that refusals make up `safety_fraction` of the
    examples (None: all of both). Judged by refusal rate on `harmful` (an AdvBench csv, a
    folder of HEx-PHI `category_*.csv`, or a JSON list), per category where the set has them,
    and, when `benign` (benign instructions, in any of the same forms) is given, by the
    over-refusal rate: the share of benign instructions refused (`over_refusal_rate`, lower is
    better). A relative `harmful` or `benign` in a config file is relative to that file's folder.

    judge: callable(instructions, responses) -> list of bool (True: refused); default the
        HEx-PHI keyword rule. Give your judge model as a class_path of a callable class.
    """

    def __init__(
        self,
        train: DataSource | None = None,
        format: Literal["alpaca"] = "alpaca",
        general: DataSource | None = None,
        general_format: Literal["alpaca"] = "alpaca",
        safety_fraction: float | None = None,
        harmful: DataPath | None = None,
        harmful_field: str = "instruction",
        benign: DataPath | None = None,
        benign_field: str = "instruction",
        judge: Judge | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if safety_fraction is not None and not 0 < safety_fraction < 1:
            raise ValueError(f"safety_fraction must be in (0, 1) or null, got {safety_fraction}.")
        self.train_source = train
        self.format = record_format(format, ("alpaca",))
        self.general = general
        self.general_format = record_format(general_format, ("alpaca",))
        self.safety_fraction = safety_fraction
        # `harmful` is always local (never a hub name), also when given as a plain str.
        self.harmful = harmful if harmful is None or isinstance(harmful, DataPath) else DataPath(harmful)
        self.harmful_field = harmful_field
        if benign is not None and harmful is None:
            raise ValueError(
                "benign instructions are given but no harmful ones: over-refusal is measured beside the "
                "refusal rate; set `harmful:` too, or drop `benign:`."
            )
        self.benign = benign if benign is None or isinstance(benign, DataPath) else DataPath(benign)
        self.benign_field = benign_field
        self.judge = judge

    def data_paths(self) -> list[tuple[str, str, str]]:
        """(role, config key, path) of the data this module reads; see `paths.check_data_files`."""
        return present([
            (TRAINING, "train.path", self.train_source and self.train_source.path),
            (TRAINING, "general.path", self.general and self.general.path),
            (BENCHMARK, "harmful", self.harmful),
            (BENCHMARK, "benign", self.benign),
        ])  # fmt: skip

    def _training_examples(self) -> datasets.Dataset:
        if self.train_source is None:
            raise ValueError("SafetyDataModule needs `train:` (refusal pairs) to fit or validate.")
        safety = self.encode(self.train_source, self.format, "train")
        if self.general is None:
            return safety
        general = self.encode(self.general, self.general_format, "general")
        keep_safety, keep_general = mixture_sizes(len(safety), len(general), self.safety_fraction)
        safety = safety.shuffle(seed=self.seed).select(range(keep_safety))
        general = general.shuffle(seed=self.seed + 1).select(range(keep_general))
        return datasets.concatenate_datasets([safety, general])

    def _eval_task(self) -> RefusalTask | None:
        if self.harmful is None:
            return None
        require_exists(self.harmful, "harmful")
        harmful = load_harmful_prompts(self.harmful, field=self.harmful_field)
        benign = None
        if self.benign is not None:
            require_exists(self.benign, "benign")
            benign = load_harmful_prompts(self.benign, field=self.benign_field)  # any instruction set loads alike
        return RefusalTask(harmful, judge=self.judge, benign=benign)
