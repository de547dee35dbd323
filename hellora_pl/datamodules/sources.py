"""Where rows come from: a hub dataset name read through `datasets`, or a local file or folder.

A `DataSource` names the data and maps the columns a format needs to the columns the data has,
so GSM8K, MetaMathQA, CodeAlpaca or a user's own jsonl go through the same code. Missing files
and data without the expected columns stop the run at set-up with a message naming both. A path
written in a config file is relative to that file's folder (see `paths`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from hellora_pl.datamodules.paths import DataPathOrName, is_local, require_exists

ROW_COLUMN, MALFORMED_COLUMN = "__row__", "__malformed__"  # the tolerant reader's columns
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DataSource:
    """One data set.

    `path`: a local file (.json, .jsonl, .parquet, .csv, optionally .gz), a local folder of
    such files, or a Hugging Face hub dataset name; relative to the working directory, or in a
    config file to that file's folder. `name` and `split` select a hub config and split (a local
    file is one split). `fields` maps the format's field names to the data's column names, e.g.
    ``{"question": "query"}``. `limit` keeps the first N rows.
    """

    path: DataPathOrName
    name: str | None = None
    split: str = "train"
    fields: dict[str, str] = field(default_factory=dict)
    limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"DataSource.path must be a file, a folder or a hub dataset name, got {self.path!r}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"DataSource.limit must be a positive number of rows or null, got {self.limit}.")

    def column(self, field_name: str) -> str:
        return self.fields.get(field_name, field_name)


def _builder_for(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in LOCAL_BUILDERS:
        raise ValueError(f"{path}: unsupported file type; use one of {sorted(LOCAL_BUILDERS)} (optionally .gz).")
    return LOCAL_BUILDERS[suffixes[-1]]


def load_source(source: DataSource) -> datasets.Dataset:
    """Read `source` into a `datasets.Dataset` (Arrow-backed and cached by `datasets`)."""
    if is_local(source.path):
        require_exists(source.path)
        rows = _load_local(Path(source.path).expanduser())
    else:
        rows = _load_hub(source)
    if source.limit is not None:
        rows = rows.select(range(min(source.limit, len(rows))))
    return rows


def _load_local(path: Path) -> datasets.Dataset:
    if path.is_dir():
        return datasets.load_dataset(str(path), split="train")
    builder = _builder_for(path)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - arrow refuses mixed types or a bad line; fall back to a row reader
        if builder != "json":
            raise ValueError(f"Could not read {path}: {err}") from err
        return _tolerant_json(path, err)


def _tolerant_json(path: Path, arrow_error: Exception) -> datasets.Dataset:
    """Read json/jsonl row by row when Arrow cannot (a bad line, or types that differ between rows).

    Each row is kept whole as JSON text in `ROW_COLUMN` (so formats see its real types and judge
    them), and an unparseable line becomes a `MALFORMED_COLUMN` reason, counted and skipped
    with the other malformed rows instead of ending the run.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        records = json.loads(text)
        records = records if isinstance(records, list) else [records]
        problems = [""] * len(records)
    except json.JSONDecodeError:
        records, problems = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
                problems.append("")
            except json.JSONDecodeError as err:
                records.append(None)
                problems.append(f"line {number} is not JSON ({err.msg})")
    if not records:
        raise ValueError(f"{path} holds no rows (Arrow said: {arrow_error}).")
    problems = [p or ("" if isinstance(r, dict) else "row is not a JSON object") for r, p in zip(records, problems)]
    rows = [json.dumps(r) if isinstance(r, dict) else "{}" for r in records]
    return datasets.Dataset.from_dict({ROW_COLUMN: rows, MALFORMED_COLUMN: problems})


def _load_hub(source: DataSource) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs the name and the cause
        raise ValueError(
            f"Could not load hub dataset {source.path!r} (config {source.name!r}, split {source.split!r}): {err}. "
            "Give a local path instead (json, jsonl, parquet or csv), or check the name and the network "
            "(HF_HUB_OFFLINE=1 forbids downloads)."
        ) from err


def check_columns(rows: datasets.Dataset, source: DataSource, required: tuple[str, ...]) -> None:
    """Stop at set-up when the data lacks a column the format needs, naming file, fields and columns."""
    missing = [name for name in required if source.column(name) not in rows.column_names]
    if missing:
        wanted = ", ".join(
            f"{name!r}" + (f" (column {source.column(name)!r})" if name in source.fields else "") for name in missing
        )
        raise ValueError(
            f"{source.path}: no field {wanted}; its columns are {rows.column_names}. Map the fields with "
            f"`fields:` in the data source, e.g. fields: {{{missing[0]}: <column>}}, or pick the matching format."
        )


def summarize_skipped(reasons: Counter) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
