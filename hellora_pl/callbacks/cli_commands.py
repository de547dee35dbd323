"""Shell commands that repeat this process's `python -m hellora_pl fit ...` with another subcommand
or checkpoint, for the resume/test/export hints printed after a fit. No Lightning here."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

CLI = ("python", "-m", "hellora_pl")
CONSOLE_SCRIPT = "hellora-pl"  # [project.scripts] in pyproject.toml
_MAIN = Path(__file__).resolve().parents[1] / "__main__.py"


def hellora_cli_argv(argv: list[str] | None = None) -> list[str] | None:
    """The arguments after the program name when this process is the hellora_pl CLI
    (`python -m hellora_pl ...` or `hellora-pl ...`), else None (a script or a notebook)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return None
    program = Path(argv[0])
    if program.name == CONSOLE_SCRIPT or (program.name == "__main__.py" and program.resolve() == _MAIN):
        return argv[1:]
    return None


def without_option(args: list[str], option: str) -> list[str]:
    """`args` minus every `option VALUE` and `option=VALUE`."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def rerun_command(subcommand: str, ckpt_path: str | Path, argv: list[str] | None = None) -> str | None:
    """This process's `fit` command line with `subcommand` in place of `fit` and `--ckpt_path ckpt_path`
    in place of any earlier one, shell-quoted; None when not launched as `hellora_pl ... fit ...`."""
    args = hellora_cli_argv(argv)
    if args is None or "fit" not in args:
        return None
    at = args.index("fit")
    rest = without_option(args[at + 1 :], "--ckpt_path")
    return shlex.join([*CLI, *args[:at], subcommand, *rest, "--ckpt_path", str(ckpt_path)])


def config_options(argv: list[str] | None = None) -> list[str]:
    """The `--config FILE` options of this process's hellora_pl command line (empty when there are none)."""
    args = hellora_cli_argv(argv) or []
    options = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            options += [arg, args[i + 1]]
        elif arg.startswith("--config="):
            options.append(arg)
    return options


def export_command(
    fmt: str,
    out: str | Path,
    ckpt_path: str | Path | None = None,
    adapter_path: str | Path | None = None,
    argv: list[str] | None = None,
) -> str | None:
    """`python -m hellora_pl export` of a checkpoint, or else of an adapter folder with this run's
    `--config` files (the backbone comes from them); None when neither source can be named."""
    if ckpt_path is not None:
        source = ["--ckpt_path", str(ckpt_path)]
    elif adapter_path is not None and config_options(argv):
        source = ["--adapter_path", str(adapter_path), *config_options(argv)]
    else:
        return None
    return shlex.join([*CLI, "export", *source, "--format", fmt, "--out", str(out)])
