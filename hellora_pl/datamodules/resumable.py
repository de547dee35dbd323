"""A training DataLoader that resumes exactly where a checkpoint left it, mid-epoch included.

Lightning saves and restores a training loader's position when the loader has `state_dict` /
`load_state_dict` (torchdata's `StatefulDataLoader`); a plain DataLoader restarts the epoch. The
position alone is not enough for an epoch-seeded order, so this loader also owns the epoch:

- Each iteration sets `set_epoch` on its sampler(s) *before* the iterator is built, from
  `epoch_fn` (the trainer's current epoch). Lightning calls `set_epoch` only after it has built
  the iterator when it resumes, and one too high after an epoch-end checkpoint; a
  `DistributedSamplerWrapper` that Lightning puts around our sampler under DDP shuffles by that
  epoch too, so every sampler is set here.
- Its state holds the epoch of the order in progress. A checkpoint written after the epoch's
  last batch (a step, validation or epoch-end checkpoint) resumes with the next epoch's order
  from its start, even though Lightning rebuilds the iterator before it advances its epoch.

Lightning 2.6 loads a loader's saved state only if it builds the loader after restoring the
loops; when `configure_optimizers` reads `trainer.estimated_stepping_batches` (ours does), it
builds it before and the state is dropped (Lightning issue #20550). So the datamodule keeps the
position too (`TrainLoaderCheckpoint`, its checkpoint hooks), and `resume_fn` hands it to the
loader's first iteration, whichever loader object Lightning iterates (it rebuilds ours under DDP).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader


def _epoch_samplers(loader: StatefulDataLoader) -> list[Any]:
    """The loader's sampler and its batch sampler's sampler, each once, that have `set_epoch`."""
    candidates = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    unique = {id(sampler): sampler for sampler in candidates if callable(getattr(sampler, "set_epoch", None))}
    return list(unique.values())


class ResumableDataLoader(StatefulDataLoader):
    """`StatefulDataLoader` whose iterations are ordered by `epoch_fn()` and whose state keeps that epoch."""

    def __init__(
        self,
        dataset: Any,
        *,
        epoch_fn: Callable[[], int],
        resume_fn: Callable[[], dict[str, Any] | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_fn = epoch_fn
        self.resume_fn = resume_fn  # returns (once) a state to resume from, or None
        self._iteration_epoch: int | None = None  # the epoch of the order being served
        self._resume_epoch: int | None = None  # set by load_state_dict for the next iteration

    def __iter__(self):
        if self.resume_fn is not None and (state := self.resume_fn()):
            self.load_state_dict(state)
        epoch = self._resume_epoch if self._resume_epoch is not None else self.epoch_fn()
        self._resume_epoch = None
        for sampler in _epoch_samplers(self):
            sampler.set_epoch(epoch)
        self._iteration_epoch = epoch
        return super().__iter__()

    def _served_all(self) -> bool:
        # `_num_yielded` is torch's count of batches the iterator has returned (main process).
        return self._iterator is not None and self._iterator._num_yielded >= len(self)

    def state_dict(self) -> dict[str, Any]:
        if self._iteration_epoch is None or self._iterator is None:
            return {}  # nothing served yet: a resume starts the trainer's epoch afresh
        state: dict[str, Any] = {
            "epoch": self._iteration_epoch,
            "num_batches": len(self),
            "num_workers": self.num_workers,  # torchdata's position differs with and without workers
        }
        if self._served_all():
            state["epoch_complete"] = True
        else:
            state["epoch_complete"] = False
            state["position"] = super().state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            super().load_state_dict({})
            return
        if "epoch" not in state_dict:
            raise ValueError(
                "This training-loader state was not written by ResumableDataLoader (it has no 'epoch'; keys: "
                f"{sorted(state_dict)}). Resume with the datamodule that wrote the checkpoint."
            )
        if state_dict["epoch_complete"]:
            self._resume_epoch = state_dict["epoch"] + 1
            super().load_state_dict({})
            return
        if state_dict["num_batches"] != len(self):
            raise ValueError(
                f"The checkpoint stopped inside an epoch of {state_dict['num_batches']} batches, but the training "
                f"loader now has {len(self)} batches per epoch, so its position cannot be restored. Resume with the "
                "same data, batch size and number of devices, or start a new fit from the checkpoint's weights."
            )
        if state_dict["num_workers"] != self.num_workers:
            raise ValueError(
                f"The checkpoint stopped inside an epoch read with num_workers={state_dict['num_workers']}, but the "
                f"training loader now has num_workers={self.num_workers}, and torchdata cannot carry a position "
                f"between the two. Resume with --data.init_args.num_workers={state_dict['num_workers']}."
            )
        self._resume_epoch = state_dict["epoch"]
        super().load_state_dict(state_dict["position"])


class TrainLoaderCheckpoint:
    """Mixin for a LightningDataModule with `batch_size` and `num_workers` whose training loader is a
    `ResumableDataLoader` built with `resume_fn=self._take_train_loader_resume` after
    `self._check_resume_layout(len(examples))`: its checkpoint hooks keep the loader's position
    (Lightning's own copy can be dropped, see above) and what that position depends on.
    """

    _train_loader_resume: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        loader = self.trainer.train_dataloader if self.trainer is not None else None
        if not isinstance(loader, ResumableDataLoader):
            return {}
        return {"train_loader": loader.state_dict(), "train_layout": self._train_layout(len(loader.dataset))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_loader_resume = state_dict or None

    def _train_layout(self, num_examples: int) -> dict[str, int]:
        processes = self.trainer.world_size if self.trainer is not None else 1
        return {
            "examples": num_examples,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "processes": processes,
        }

    def _check_resume_layout(self, num_examples: int) -> None:
        """A position inside an epoch only means something for the same examples in the same batches.

        Checked when the training loader is built, so the message is not buried under Lightning's teardown.
        """
        resume = self._train_loader_resume
        if not resume or resume["train_loader"].get("epoch_complete", True):
            return
        saved, now = resume["train_layout"], self._train_layout(num_examples)
        changed = [f"{key} {saved[key]} -> {now[key]}" for key in saved if saved[key] != now[key]]
        if changed:
            raise ValueError(
                "The checkpoint stopped inside an epoch, and the training data changed since: "
                f"{', '.join(changed)}. Its place in the epoch cannot be restored. Resume with the same data, "
                "batch_size, num_workers and number of processes, or start a new fit from the checkpoint's weights."
            )

    def _take_train_loader_resume(self) -> dict[str, Any] | None:
        resume, self._train_loader_resume = self._train_loader_resume, None
        return resume["train_loader"] if resume else None
