"""Rows to training examples: validate, render, tokenize (cached by `datasets`), count, pack.

Malformed rows are counted by reason and skipped at set-up, so an epoch never meets one.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import datasets

from hellora_pl.datamodules.collate import IGNORE_INDEX, tokenize_prompt_response
from hellora_pl.datamodules.formats import PromptTemplate, RecordFormat
from hellora_pl.datamodules.sources import (
    MALFORMED_COLUMN,
    ROW_COLUMN,
    DataSource,
    check_columns,
    load_source,
    summarize_skipped,
)

PROMPT_TOO_LONG = "prompt longer than max_length"


@dataclass
class EncodingStats:
    """What happened to one split's rows; logged at set-up."""

    rows: int = 0
    used: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self, split: str, max_length: int) -> str:
        text = f"{split}: {self.rows} rows, {self.used} used, {self.truncated} truncated to {max_length} tokens"
        if self.skipped:
            text += f", skipped {summarize_skipped(self.skipped)}"
        return text


def canonical_row(row: dict[str, Any], source: DataSource, fmt: RecordFormat) -> dict[str, Any]:
    """The row under the format's field names (`source.fields` maps them to the data's columns)."""
    if row.get(MALFORMED_COLUMN):
        return {MALFORMED_COLUMN: row[MALFORMED_COLUMN]}
    if ROW_COLUMN in row:  # read by the tolerant json reader: the row as it was written
        row = json.loads(row[ROW_COLUMN])
    return {name: row.get(source.column(name)) for name in (*fmt.required, *fmt.optional)}


def _encode(row, *, source: DataSource, fmt: RecordFormat, template: PromptTemplate, max_length: int):
    record = canonical_row(row, source, fmt)
    problem = record.get(MALFORMED_COLUMN) or fmt.problem(record)
    if problem:
        return {"input_ids": [], "labels": [], "truncated": False, "skip": problem}
    instruction = fmt.instruction(record)
    prompt = template.prompt(instruction)
    response = template.response(instruction, fmt.response(record))
    example = tokenize_prompt_response(template.tokenizer, prompt, response, max_length, add_eos=not template.uses_chat)
    if all(label == IGNORE_INDEX for label in example["labels"]):
        return {"input_ids": [], "labels": [], "truncated": False, "skip": PROMPT_TOO_LONG}
    return {**example, "skip": ""}


def encode_source(
    source: DataSource, fmt: RecordFormat, template: PromptTemplate, max_length: int
) -> tuple[datasets.Dataset, EncodingStats]:
    """Tokenized examples (input_ids, labels) of `source`, and what was skipped or truncated."""
    rows = load_source(source)
    if ROW_COLUMN not in rows.column_names:
        check_columns(rows, source, fmt.required)
    return encode_rows(rows, source, fmt, template, max_length)


def encode_rows(
    rows: datasets.Dataset, source: DataSource, fmt: RecordFormat, template: PromptTemplate, max_length: int
) -> tuple[datasets.Dataset, EncodingStats]:
    encoded = rows.map(
        _encode,
        fn_kwargs={"source": source, "fmt": fmt, "template": template, "max_length": max_length},
        remove_columns=rows.column_names,
        desc=f"Tokenizing {source.path}",
    )
    reasons = Counter(reason for reason in encoded["skip"] if reason)
    kept = encoded.filter(lambda skip: not skip, input_columns="skip") if reasons else encoded
    kept = kept.remove_columns("skip")
    stats = EncodingStats(rows=len(rows), used=len(kept), truncated=sum(kept["truncated"]), skipped=reasons)
    if not len(kept):
        raise ValueError(
            f"{source.path}: none of its {len(rows)} rows could be used ({summarize_skipped(reasons)}). "
            f"The format {fmt.name!r} needs the fields {list(fmt.required)}; map them with `fields:`."
        )
    return kept, stats


def pack_examples(examples: datasets.Dataset | list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Greedily concatenate whole examples into sequences of at most `max_length` tokens.

    Each packed sequence carries `position_ids` restarting at every example, which is how
    transformers tells packed sequences apart and keeps attention within each.
    """
    packed: list[dict[str, Any]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        ids, labels = list(example["input_ids"]), list(example["labels"])
        if current["input_ids"] and len(current["input_ids"]) + len(ids) > max_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        current["labels"] += labels
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        packed.append(current)
    return packed
