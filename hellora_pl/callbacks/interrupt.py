"""InterruptCheckpoint: Ctrl-C or SIGTERM during fit keeps the work and says how to resume."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from .cli_commands import rerun_command


class InterruptCheckpoint(Callback):
    """On SIGINT (Ctrl-C) or SIGTERM during fit: finish the optimizer step, save, stop, print the resume command.

    The first signal only raises a flag. At the next optimizer-step boundary (after the batch
    that completes a gradient accumulation, so no accumulated gradient is lost) every rank agrees
    to stop (the flag is reduced over ranks, so a signal that reached one rank stops all of them
    at the same step), the trainer writes `<ModelCheckpoint dirpath>/<filename>`, stops cleanly
    (no extra validation; `on_train_end` and `on_fit_end` run, so adapters and the run summary are
    written) and rank 0 prints `python -m hellora_pl fit <the same arguments> --ckpt_path <it>`
    (or the `Trainer.fit(ckpt_path=...)` form when not launched through the hellora_pl CLI).

    A file of its own rather than an update of `last.ckpt`: ModelCheckpoint keeps its own
    bookkeeping of `last` (a copy, or a link to a top-k file with `save_last: link`, which writing
    through would overwrite) and of the top-k files; a separate `interrupted.ckpt` leaves all of
    that alone, and its name says what happened. Under `fast_dev_run`, or with no ModelCheckpoint
    (checkpointing disabled), nothing is written and the message says so.

    A second signal gets the handler that was there before: a second Ctrl-C raises
    KeyboardInterrupt at once (Lightning then shuts down without saving and exits with status 1);
    a second SIGTERM goes to Lightning's own handler, which stops after the current batch.

    Lightning 2.6 installs its SIGTERM handler when fit starts running; it sets
    `trainer.received_sigterm` and raises SIGTERMException (a SystemExit) after the current batch,
    mid-accumulation too, without a checkpoint. This callback replaces both handlers from
    `on_train_start` to `on_train_end` (or `on_exception`), then puts back what was there, before
    Lightning restores its own originals. A signal during validation takes effect at the next
    optimizer step after it. Signals are handled in the main thread only (Python's rule); elsewhere
    this callback does nothing. With several callbacks of this type, only the first acts.
    """

    def __init__(self, filename: str = "interrupted.ckpt", signals: list[str] | None = None):
        if not filename.endswith(".ckpt") or Path(filename).name != filename:
            raise ValueError(
                f"InterruptCheckpoint(filename={filename!r}): give a file name ending in .ckpt, without "
                "folders (the file goes into the ModelCheckpoint's dirpath), e.g. 'interrupted.ckpt'."
            )
        names = ["SIGINT", "SIGTERM"] if signals is None else list(signals)
        unknown = [name for name in names if not isinstance(getattr(signal, str(name), None), signal.Signals)]
        if unknown or not names:
            raise ValueError(
                f"InterruptCheckpoint(signals={signals!r}): {unknown or 'no signals'} are not signal names "
                "of this platform; use names such as 'SIGINT', 'SIGTERM' or 'SIGUSR1'."
            )
        self.filename = filename
        self.signals = [getattr(signal, name) for name in names]
        self.received: signal.Signals | None = None  # the first signal this process received
        self.checkpoint_path: Path | None = None  # written on interrupt (absolute)
        self.stopped_at_step: int | None = None
        self._previous: dict[signal.Signals, object] = {}
        self._acts = True
        self._is_global_zero = True
        self._last_step = 0

    @property
    def interrupted(self) -> bool:
        """Whether this fit was stopped by a signal."""
        return self.stopped_at_step is not None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._acts = next(cb for cb in trainer.callbacks if isinstance(cb, InterruptCheckpoint)) is self
        if stage == "fit":
            self.received, self.checkpoint_path, self.stopped_at_step = None, None, None

    # -- signal handling -----------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        self._is_global_zero = trainer.is_global_zero
        if not self._acts or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.received is not None:
            return
        self.received = signal.Signals(signum)
        for other, previous in self._previous.items():  # a second signal aborts at once
            signal.signal(other, _abort_handler(other, previous))
        if self._is_global_zero:
            # os.write: print() from a signal handler can hit a reentrant write on the same stream.
            message = (
                f"\n[hellora] {self.received.name}: stopping after the current optimizer step and saving a "
                "checkpoint; send it again to abort without saving.\n"
            )
            try:
                os.write(sys.stderr.fileno(), message.encode())
            except (OSError, ValueError):
                pass

    def _restore_handlers(self) -> None:
        """Back to the handlers found at the start of training (SIG_IGN included)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    # -- stopping at an optimizer-step boundary ------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if not self._acts or trainer.global_step == self._last_step:
            return  # mid-accumulation: no optimizer step in this batch
        self._last_step = trainer.global_step
        # Every rank reaches this boundary, so every rank takes part in the reduction (any rank's flag).
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            self._stop(trainer)

    def _stop(self, trainer: Trainer) -> None:
        self._restore_handlers()
        self.stopped_at_step = trainer.global_step
        reason = self.received.name if self.received is not None else "a signal on another rank"
        lines = [f"[hellora] {reason}: stopped after global step {trainer.global_step}"]
        checkpoint = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
        if trainer.fast_dev_run:
            lines[0] += "; fast_dev_run writes no checkpoint, so nothing was saved"
        elif checkpoint is None or checkpoint.dirpath is None:
            lines[0] += "; checkpointing is disabled (no ModelCheckpoint), so nothing was saved"
        else:
            self.checkpoint_path = Path(checkpoint.dirpath, self.filename).absolute()
            trainer.save_checkpoint(self.checkpoint_path)  # every rank: a sharded save is collective
            lines[0] += f"; checkpoint: {self.checkpoint_path}"
            lines += resume_hint(self.checkpoint_path)
        # Stop like EarlyStopping does, but skip the validation that `should_stop` triggers and let
        # min_steps / min_epochs not keep the run going.
        trainer.should_stop = True
        trainer.fit_loop.epoch_loop._skip_next_val = True
        trainer.fit_loop.epoch_loop.min_steps = None
        trainer.fit_loop.min_epochs = None
        rank_zero_info("\n".join(lines))

    # -- putting the handlers back -------------------------------------------------------
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()
        if self.received is not None and not self.interrupted:
            rank_zero_info(f"[hellora] {self.received.name} came after the last optimizer step: the run finished")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()


def resume_hint(checkpoint_path: Path) -> list[str]:
    """Lines telling how to resume from `checkpoint_path`: the CLI command when this process is the
    hellora_pl CLI, else the Python form."""
    command = rerun_command("fit", checkpoint_path)
    if command is None:
        return [f"[hellora] resume with trainer.fit(model, datamodule, ckpt_path={str(checkpoint_path)!r})"]
    return [f"[hellora] resume (from {Path.cwd()}) with:", f"    {command}"]


def _abort_handler(signum: int, previous):
    """What a second signal does: the previous handler, or, where the process ignored the signal
    (a job started in the background inherits SIG_IGN for SIGINT), the default that ends the run."""
    if callable(previous):
        return previous
    return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
