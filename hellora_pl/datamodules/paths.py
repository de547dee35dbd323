"""Data paths that resolve where they were written: a config file's folder, or the working directory.

jsonargparse (under LightningCLI) reads each config file with the working directory set to that
file's folder; its own `Path` types rely on this. `DataPath` and `DataPathOrName` are `str`s
resolved at that moment, so a config names its data relative to itself and runs from any folder,
while a path given on the command line resolves against the working directory as usual. Each
remembers the path as written and the config file it came from, so a missing file is reported
with all three. Resolving never checks that the file exists: a config parses (and
`--print_config` prints it) on a machine without its data; the run stops at set-up instead, or
earlier through `check_data_files`. A plain `str` (from Python) is read from the working
directory, as any path is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".gz")  # what sources.LOCAL_BUILDERS reads, and .gz
TRAINING, BENCHMARK = "training", "benchmark"  # which stages read a data path: see `check_data_files`


class DataFileNotFoundError(FileNotFoundError):
    """A local data file or folder named by the configuration does not exist; the message says which and the fix."""


class DataPath(str):
    """A local file or folder, resolved against the folder of the config file that names it.

    The string is the path to read (absolute when it came through the CLI). `written` is the path
    as written; `config` the config file it was written in (None: the command line or Python).
    """

    written: str
    config: str | None
    local: bool = True

    def __new__(cls, path: str, written: str | None = None, config: str | None = None, local: bool = True):
        value = super().__new__(cls, path)
        value.written = path if written is None else written
        value.config = config
        value.local = local
        return value

    @classmethod
    def resolve(cls, value: str) -> DataPath:
        """The jsonargparse deserializer: `value` against the current folder (a config file's, while read)."""
        return cls(_against_current_folder(_checked(value)), value, _config_file())


class DataPathOrName(DataPath):
    """A local data path (as `DataPath`) or a Hugging Face hub dataset name, kept as written.

    A value is local when it exists relative to where it was written or looks like a path
    (starts with ".", "/" or "~", or ends in a data file suffix); otherwise it is a hub name.
    """

    @classmethod
    def resolve(cls, value: str) -> DataPath:
        resolved = _against_current_folder(_checked(value))
        if os.path.exists(resolved) or looks_local(value):
            return cls(resolved, value, _config_file())
        return cls(value, value, _config_file(), local=False)


def looks_local(path: str) -> bool:
    """A path rather than a hub dataset name, by its form alone."""
    return path.startswith((".", "/", "~")) or path.lower().endswith(LOCAL_SUFFIXES)


def is_local(path: str) -> bool:
    """Whether `path` is read from disk: a resolved `DataPath` says so; a plain str when it exists or looks local."""
    if isinstance(path, DataPath):
        return path.local
    return os.path.exists(os.path.expanduser(path)) or looks_local(path)


def is_missing(path: str) -> bool:
    """A local data path that does not exist (a hub name is never missing here)."""
    return is_local(path) and not os.path.exists(os.path.expanduser(path))


def require_exists(path: str, key: str | None = None) -> None:
    """Raise `DataFileNotFoundError` when the local data `path` is missing; `key` names its config field."""
    if is_missing(path):
        raise DataFileNotFoundError(missing_message(path, key))


def missing_message(path: str, key: str | None = None) -> str:
    """One line: the path as written, what it resolved to and against what, and the fix."""
    written = path.written if isinstance(path, DataPath) else path
    config = path.config if isinstance(path, DataPath) else None
    resolved = os.path.abspath(os.path.expanduser(path))
    override = f" (--data.init_args.{key} PATH)" if key else ""
    if config:
        where = f"written in {config}, so resolved against that file's folder to {resolved}"
        fix = f"correct it there, relative to that folder, or give the path on the command line{override}"
    else:
        where = f"resolved against the working directory to {resolved}"
        fix = "give an absolute path, or one relative to the working directory (or, in a config file, to its folder)"
    return f"Data file {written!r}{f' ({key})' if key else ''} does not exist: {where}. Fix: {fix}."


def check_data_files(datamodule, stage: str) -> None:
    """Stop before anything runs when a local data file that `stage` reads is missing, naming every one.

    A datamodule lists its paths with `data_paths()`: (TRAINING or BENCHMARK, config key, path)
    triples. Training data is read by fit and validate; the benchmark by test and predict, and by
    fit and validate when `evaluate_in_validation` is set. Datamodules without `data_paths` pass.
    """
    listed = getattr(datamodule, "data_paths", None)
    if listed is None:
        return
    reads = {TRAINING: stage in ("fit", "validate")}
    reads[BENCHMARK] = stage in ("test", "predict") or bool(getattr(datamodule, "evaluate_in_validation", False))
    missing = [missing_message(path, key) for role, key, path in listed() if reads[role] and is_missing(path)]
    if missing:
        raise DataFileNotFoundError("\n".join(missing))


def present(triples: Iterable[tuple[str, str, str | None]]) -> list[tuple[str, str, str]]:
    """The (role, key, path) triples whose path is set."""
    return [(role, key, path) for role, key, path in triples if path is not None]


def _checked(value) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"a data path must be a non-empty string (a file, folder or hub dataset name), got {value!r}")
    return value


def _against_current_folder(path: str) -> str:
    return os.path.abspath(os.path.join(os.getcwd(), os.path.expanduser(path)))


def _config_file() -> str | None:
    """The config file jsonargparse is reading now, if any (its load stack is private: fail soft)."""
    try:
        from jsonargparse._util import config_load_stack

        stack = config_load_stack.get()
    except (ImportError, AttributeError):
        return None
    return stack[-1][0] if stack else None


def _register_with_jsonargparse() -> None:
    """Parse both types from configs and flags with `resolve`; dump them as the resolved path."""
    from jsonargparse.typing import register_type

    for kind in (DataPath, DataPathOrName):
        register_type(kind, serializer=str, deserializer=kind.resolve)


_register_with_jsonargparse()
