"""The LightningModule around a transformers MoE causal LM."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Literal

import torch
from lightning.pytorch import LightningModule

from .backbones import BackboneConfig
from .backbones.aux_loss import set_load_balancing_loss
from .evaluation.runner import BenchmarkRunner
from .loading import load_backbone


class HelloraModule(LightningModule):
    """Causal-LM fine-tuning: loss on response tokens only (labels -100 elsewhere).

    The backbone is built in `__init__`, so callbacks can profile and inject adapters in their
    `setup`; AdamW then optimizes whatever is trainable at that point. `warmup` is a number of
    optimizer steps, or a fraction of all steps when below 1. `router_aux_loss_coef` adds the
    model's load-balancing loss with that coefficient (None: the model config's own setting);
    `train/aux_loss` logs it when the model reports it.
    """

    def __init__(
        self,
        backbone: BackboneConfig,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup: float = 0.03,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        min_lr_ratio: float = 0.1,
        gradient_checkpointing: bool = False,
        router_aux_loss_coef: float | None = None,
    ):
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}.")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0 (steps, or a fraction of steps below 1), got {warmup}.")
        if isinstance(backbone, dict):  # as stored in a checkpoint's hyper-parameters
            backbone = BackboneConfig(**backbone)
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams["backbone"] = asdict(backbone)
        self.model = load_backbone(backbone)
        if router_aux_loss_coef is not None:
            set_load_balancing_loss(self.model, router_aux_loss_coef)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._step_started: float | None = None
        self.benchmark: BenchmarkRunner | None = None  # set in setup when the datamodule has an eval_task

    def forward(self, input_ids, attention_mask=None, labels=None, position_ids=None):
        extra = {}
        if not self.training and getattr(self.model.config, "output_router_logits", False):
            extra["output_router_logits"] = False  # val/test losses are the LM loss alone, whatever the aux coefficient
        if position_ids is not None:
            extra["position_ids"] = position_ids  # packed sequences: transformers keeps attention within each
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False, **extra)

    def _loss(self, batch):
        return self(batch["input_ids"], batch.get("attention_mask"), batch["labels"], batch.get("position_ids"))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        check_vocabulary(self.model, tokenizer)
        task = getattr(datamodule, "eval_task", None)
        if task is not None and self.benchmark is None:
            stages = ("val", "test") if getattr(datamodule, "evaluate_in_validation", False) else ("test",)
            self.benchmark = BenchmarkRunner(task, datamodule.generation, tokenizer, stages)

    def configure_model(self) -> None:
        """Under ModelParallelStrategy, shard the backbone with FSDP2 (after the callbacks injected adapters)."""
        if self._device_mesh is None:
            return  # any other strategy: nothing to do here
        from .sharding import shard_backbone

        mesh = self._device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "HelloraModule shards with FSDP only: use ModelParallelStrategy(data_parallel_size=<devices>, "
                "tensor_parallel_size=1)."
            )
        shard_backbone(self.model, mesh["data_parallel"] if mesh.mesh_dim_names else mesh)

    # -- steps ---------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch, batch_idx):
        outputs = self._loss(batch)
        loss = outputs.loss
        self.log("train/loss", loss, prog_bar=True)
        if getattr(outputs, "aux_loss", None) is not None:
            self.log("train/aux_loss", outputs.aux_loss)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._step_started
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.log("train/tokens_per_sec", tokens / max(elapsed, 1e-9))

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return self._evaluation_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        return self._evaluation_step(batch, batch_idx, "test")

    def _evaluation_step(self, batch, batch_idx, stage: str):
        if "prompt_ids" in batch:  # a batch of benchmark prompts: generate and score
            if self.benchmark is None:
                raise RuntimeError("Got benchmark prompts but the datamodule exposes no eval_task.")
            self.benchmark.step(self.model, batch, batch_idx, stage)
            return None
        loss = self._loss(batch).loss
        # Weight each batch by its response tokens so the epoch value is a per-token mean.
        self.log(
            f"{stage}/loss",
            loss,
            prog_bar=stage == "val",
            batch_size=_response_tokens(batch),
            sync_dist=True,
            add_dataloader_idx=False,
        )
        return loss

    def on_validation_epoch_end(self) -> None:
        self._finish_benchmark("val")

    def on_test_epoch_end(self) -> None:
        self._finish_benchmark("test")

    def _finish_benchmark(self, stage: str) -> None:
        if self.benchmark is None or self.trainer.sanity_checking:
            return
        values = self.benchmark.finish(stage, self.trainer)
        for name, value in values.items():
            self.log(name, value, sync_dist=False, add_dataloader_idx=False)  # already reduced across ranks

    # -- optimization --------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("Nothing to train: every parameter is frozen.")
        hp = self.hparams
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(hp.warmup * total) if hp.warmup < 1 else int(hp.warmup)
        schedule = lr_lambda(hp.lr_schedule, warmup, total, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_vocabulary(model, tokenizer) -> None:
    """Every token id the tokenizer can produce must have a row in the model's embedding."""
    if tokenizer is None:
        return
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} rows; "
            "use the model's own tokenizer, or raise vocab_size in the backbone config."
        )


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Linear warm-up to the base rate, then constant or cosine decay to `min_ratio` of it."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"Unknown lr_schedule {schedule!r}; choose 'cosine' or 'constant'.")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _response_tokens(batch) -> int:
    return max(1, int((batch["labels"] != -100).sum()))
