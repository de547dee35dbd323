"""`python -m hellora_pl fit|validate|test --config FILE` (LightningCLI over HelloraModule), and `export`.

The method's callbacks are top-level groups of the command line, so a flag or a second config
changes the method without rewriting `trainer.callbacks` (which a later config replaces whole):

  --hellora.*       HotExpertInjectionCallback: method, rank, alpha, hot_experts, ...
  --profiler.*      RoutingProfilerCallback
  --lori.*          LoRIMaskCallback, used when the method is hellori
  --dynamic_rank.*  DynamicRankCallback, used when the method is dr_lora
  --checkpoint.*    ModelCheckpoint (val/loss, save_last)

Mistakes are reported before anything expensive runs or any folder is made: one short message
with the value and the fix, no usage text and no traceback (HELLORA_TRACEBACK=1 shows it).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from argparse import ArgumentError

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from .adapters.methods import method_defaults
from .callbacks import (
    DynamicRankCallback,
    HotExpertInjectionCallback,
    InterruptCheckpoint,
    LoRIMaskCallback,
    RoutingProfilerCallback,
    RunSummary,
)
from .callbacks.injection import check_injection_settings, check_reselection_watch
from .callbacks.progress import StepBoundProgressBar
from .datamodules.paths import check_data_files
from .module import HelloraModule, check_vocabulary

PROG = "python -m hellora_pl"
DESCRIPTION = (
    "Fine-tune a Mixture-of-Experts LM with adapters where the router sends tokens (fit, validate, test). "
    f"`{PROG} export --help`: a run's adapters to a PEFT adapter or a merged model."
)

# Group on the command line -> the callback it builds. Order matters: the injection callback's
# setup runs its checks before it asks the profiler for a profile.
CALLBACK_GROUPS = {
    "hellora": HotExpertInjectionCallback,
    "profiler": RoutingProfilerCallback,
    "lori": LoRIMaskCallback,
    "dynamic_rank": DynamicRankCallback,
    "checkpoint": ModelCheckpoint,
}
COMPANIONS = {"lori": "lori", "dynamic_rank": "dynamic_rank"}  # group -> the Method flag that needs it


class CommandLineError(ValueError):
    """A mistake in the command line or config, reported as one short message."""


class HelloraCLI(LightningCLI):
    """LightningCLI whose model is a HelloraModule; the method's callbacks are top-level groups."""

    def add_arguments_to_parser(self, parser) -> None:
        for group, callback in CALLBACK_GROUPS.items():
            parser.add_lightning_class_args(callback, group)
        parser.set_defaults({"checkpoint.monitor": "val/loss", "checkpoint.save_last": True})

    def parse_arguments(self, parser, args) -> None:
        # Remember every option, so a misspelt one can be answered with the closest.
        for sub in getattr(self, "_subcommand_parsers", {}).values():
            _KNOWN_OPTIONS.extend(o for o in sub._option_string_actions if o.startswith("--"))
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """Checks of the config alone, before the model is loaded."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_accelerator(config.trainer.accelerator)
        self._check_trainer_callbacks(config.trainer.callbacks)
        self._check_companions(config)
        h = config.hellora
        check_injection_settings(h.rank, h.alpha, h.dropout, h.adapter_dtype, h.router_rank, h.adapter_path)
        if self.subcommand in (None, "fit"):
            check_reselection_watch(h.reselect_every_n_steps, config.profiler.watch_every_n_steps)
        if self.subcommand and config.get("data") is not None:
            check_data_files(_datamodule_alone(config.data), self.subcommand)

    def _check_trainer_callbacks(self, callbacks) -> None:
        """The method's callbacks live in their groups; a copy under trainer.callbacks would run twice."""
        for entry in callbacks or []:
            class_path = str(getattr(entry, "class_path", entry))
            for group, callback in CALLBACK_GROUPS.items():
                if class_path.split(".")[-1] == callback.__name__:
                    raise CommandLineError(
                        f"trainer.callbacks lists {callback.__name__}, which the CLI already adds from the "
                        f"top-level `{group}:` group; move its init_args there (e.g. `{group}: {{...}}` in the "
                        f"config, or --{group}.<option> on the command line) and drop it from trainer.callbacks."
                    )

    def _check_companions(self, config) -> None:
        """A companion's settings changed for a method that does not use them would be silently ignored."""
        method = method_defaults(config.hellora.method)
        defaults = self._parser(self.subcommand).get_defaults()
        for group, flag in COMPANIONS.items():
            if not getattr(method, flag) and config[group] != defaults[group]:
                raise CommandLineError(
                    f"`{group}` settings are given, but method {method.name!r} does not use "
                    f"{CALLBACK_GROUPS[group].__name__}; drop them, or choose the method that does "
                    f"(--hellora.method {'hellori' if group == 'lori' else 'dr_lora'})."
                )

    def instantiate_trainer(self, **kwargs):
        """Checks that need the built model and data run here, before the Trainer prints or writes anything."""
        injection = self._get(self.config_init, "hellora")
        check_vocabulary(self.model.model, getattr(self.datamodule, "tokenizer", None))
        injection.check_model(self.model.model)
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        log_dir = planned_log_dir(trainer_config)
        if self.subcommand == "fit" and log_dir is not None and not trainer_config.get("fast_dev_run"):
            if self._get(self.config, "ckpt_path") is None:
                injection.check_output_dir(log_dir)
        method = method_defaults(injection.method)
        given = trainer_config.get("callbacks") or []
        listed = {type(cb) for cb in (given if isinstance(given, list) else [given])}
        # The run's report: a summary at the end, a checkpoint and a resume command on Ctrl-C/SIGTERM.
        callbacks = [kind() for kind in (RunSummary, InterruptCheckpoint) if kind not in listed]
        if _RICH_AVAILABLE and trainer_config.get("enable_progress_bar") is not False and not any(
            issubclass(kind, ProgressBar) for kind in listed
        ):
            callbacks.append(StepBoundProgressBar())
        for group in CALLBACK_GROUPS:
            if group in COMPANIONS and not getattr(method, COMPANIONS[group]):
                continue  # that method's companion is not used
            if group == "checkpoint" and (
                trainer_config.get("enable_checkpointing") is False or trainer_config.get("fast_dev_run")
            ):
                continue
            callbacks.append(self._get(self.config_init, group))
        return self._instantiate_trainer(trainer_config, callbacks)


    # -- running: the checkpoint goes to the Trainer before it starts ---------------------
    def fit(self, model, ckpt_path=None, **kwargs) -> None:
        self.trainer.fit(model, ckpt_path=self._restoring(ckpt_path), **kwargs)

    def validate(self, model, ckpt_path=None, **kwargs) -> None:
        self.trainer.validate(model, ckpt_path=self._restoring(ckpt_path), **kwargs)

    def test(self, model, ckpt_path=None, **kwargs) -> None:
        self.trainer.test(model, ckpt_path=self._restoring(ckpt_path), **kwargs)

    def _restoring(self, ckpt_path):
        """Set a checkpoint file as `trainer.ckpt_path`, which the callbacks' setup can read (Lightning
        records a `ckpt_path=` argument only after setup), so a restored run injects the checkpoint's
        plan instead of profiling routing again. "last", "best" and the like stay Lightning's to resolve."""
        if ckpt_path is not None and os.path.exists(ckpt_path):
            self.trainer.ckpt_path = ckpt_path
            return None
        return ckpt_path


def _datamodule_alone(data_config):
    """The datamodule built on its own (cheap: data is read in setup), to check its files before the model loads."""
    parser = LightningArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    return parser.instantiate_classes(Namespace(data=data_config)).data


def planned_log_dir(trainer_config: dict):
    """The Trainer's `log_dir` before the Trainer exists, as Lightning will compute it (None: not knowable)."""
    from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

    logger = trainer_config.get("logger")
    first = logger[0] if isinstance(logger, list) and logger else logger
    if isinstance(first, (TensorBoardLogger, CSVLogger)):
        return first.log_dir
    if isinstance(first, Logger):
        return first.save_dir
    if first is False or first is None or (isinstance(logger, list) and not logger):
        return trainer_config.get("default_root_dir") or os.getcwd()
    return None  # logger=True: Lightning makes a TensorBoardLogger with a fresh version


def check_accelerator(accelerator) -> None:
    """Refuse an accelerator this machine or this build of torch lacks, before a model is loaded."""
    name = str(accelerator).lower() if isinstance(accelerator, str) else None
    if name in (None, "auto", "cpu"):
        return
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    import torch

    if name in ("gpu", "cuda") and not (CUDAAccelerator.is_available() or (name == "gpu" and MPSAccelerator.is_available())):
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
        raise CommandLineError(
            f"--trainer.accelerator {accelerator} needs a GPU, but this machine has none usable ({build}, "
            f"torch {torch.__version__}). Use --trainer.accelerator cpu, or install a CUDA build of torch "
            "(https://pytorch.org/get-started/locally/) on a machine with a GPU."
        )


# -- errors as one short message ---------------------------------------------------------

USER_ERRORS = (ArgumentError, CommandLineError, ValueError, FileNotFoundError, FileExistsError, MisconfigurationException)


def short_message(err: BaseException) -> str:
    """The error in a few lines: what is wrong, the value, and the fix."""
    text = str(err).strip()
    for pattern in (r"unrecognized arguments: (--[\w.]+)", r"does not accept option '([\w.]+)'", r'Key "([\w.]+)" is not expected'):
        found = re.search(pattern, text)
        if found:
            option = found.group(1) if found.group(1).startswith("--") else "--" + found.group(1)
            return _did_you_mean(option, text)
    key = re.match(r'Parser key "([\w.]+)"', text)
    choices = re.search(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (.*)", text)
    if key and choices:
        return f"--{key.group(1)} {choices.group(2).strip()} is not one of: {choices.group(1)}."
    nested = re.search(r"NestedArg\(key='(\w+)', val='(.*?)'\)", text)
    if key and nested:
        return (
            f"--{key.group(1)}.{nested.group(1)} needs the class first: --{key.group(1)} <class> "
            f"--{key.group(1)}.{nested.group(1)} {nested.group(2)} (for example --hellora.hot_experts TopKPerLayer)."
        )
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[:4]) if lines else type(err).__name__


_KNOWN_OPTIONS: list[str] = []


def _did_you_mean(option: str, text: str) -> str:
    first = text.splitlines()[0]
    close = difflib.get_close_matches(option, _KNOWN_OPTIONS, n=1, cutoff=0.75)
    if close:
        return f"{first}\nDid you mean {close[0]}? ({PROG} fit --help lists every option)"
    return f"{first}\n{PROG} fit --help lists every option."


def main(args=None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["export"]:  # not a Lightning subcommand: adapters out to PEFT or a merged model
        from .export_cli import main as export_main

        return export_main(argv[1:])
    try:
        HelloraCLI(
            HelloraModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": False},
            # a typo in a flag is an error, not a prefix match; errors come back to us to print short
            parser_kwargs={"allow_abbrev": False, "exit_on_error": False, "prog": PROG, "description": DESCRIPTION},
            args=args,
        )
    except USER_ERRORS as err:
        if os.environ.get("HELLORA_TRACEBACK"):
            raise
        subcommand = argv[0] if argv and not argv[0].startswith("-") else "fit"
        print(f"{PROG} {subcommand}: error: {short_message(err)}", file=sys.stderr)
        print("(HELLORA_TRACEBACK=1 shows the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
