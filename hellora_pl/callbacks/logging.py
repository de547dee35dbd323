"""Helpers to send scalars, text, images and figures to whatever loggers the trainer has.

Text, images and figures go to TensorBoard loggers only; other loggers are skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure


def log_scalars(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def log_text(trainer: Trainer, tag: str, text: str, step: int) -> None:
    for logger in _tensorboards(trainer):
        logger.experiment.add_text(tag, text, global_step=step)


def log_image(trainer: Trainer, tag: str, image: torch.Tensor, step: int) -> None:
    """`image` is uint8 [3, H, W]."""
    for logger in _tensorboards(trainer):
        logger.experiment.add_image(tag, image, global_step=step, dataformats="CHW")


def log_figure(trainer: Trainer, tag: str, make_figure: Callable[[], Figure], step: int) -> None:
    """Log a matplotlib figure (TensorBoard `add_figure`); `make_figure` runs only when one will take it."""
    tensorboards = _tensorboards(trainer)
    if not tensorboards:
        return
    figure = make_figure()
    for logger in tensorboards:
        # close=False: the figure is not pyplot's (matplotlib.figure.Figure); it is freed with its last reference.
        logger.experiment.add_figure(tag, figure, global_step=step, close=False)


def _tensorboards(trainer: Trainer) -> list[TensorBoardLogger]:
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
