"""Helpers to send scalars, text and images to whatever loggers the trainer has."""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger


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


def _tensorboards(trainer: Trainer) -> list[TensorBoardLogger]:
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
