"""A fit resumed from any checkpoint, mid-epoch included, sees exactly the batches and losses of an uninterrupted one.

Three levels: the training loader on its own (workers, DDP as Lightning rebuilds it), the
datamodule inside a Trainer (every kind of checkpoint), and the CLI. The CLI tests SIGKILL a run
one step after its step-N checkpoint (N inside an epoch), resume it with `--ckpt_path`, and
compare every later train loss with an uninterrupted run's, exactly: every run is its own
process on CPU with one thread (OMP_NUM_THREADS=MKL_NUM_THREADS=1) and the same layout (one
process, one device), so the float sums agree bit for bit.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, DistributedSampler

from conftest import REPO
from hellora_pl.datamodules import ArithmeticDataModule, EpochShuffleSampler, ResumableDataLoader
from hellora_pl.datamodules.arithmetic import generate_arithmetic_problems


def digest(batch) -> str:
    return hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12]


# -- the loader on its own ----------------------------------------------------------------------


def number_loader(epoch, num_workers=0):
    """18 numbers in batches of 4 (5 batches, the last short), shuffled by (seed 3, epoch[0])."""
    return ResumableDataLoader(
        list(range(18)),
        sampler=EpochShuffleSampler(18, seed=3),
        batch_size=4,
        epoch_fn=lambda: epoch[0],
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def as_lists(batches):
    return [batch.tolist() for batch in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_inside_an_epoch_and_after_its_end(num_workers):
    epoch = [1]
    straight = number_loader(epoch, num_workers)
    iterator = iter(straight)
    served = [next(iterator).tolist() for _ in range(2)]
    inside = straight.state_dict()
    rest = as_lists(iterator)
    complete = straight.state_dict()
    assert sorted(sum(served + rest, [])) == list(range(18))
    assert inside["epoch"] == 1 and not inside["epoch_complete"] and complete["epoch_complete"]

    resumed = number_loader([7], num_workers)  # the epoch comes from the state, not from epoch_fn
    resumed.load_state_dict(inside)
    assert as_lists(resumed) == rest

    # After the epoch's last batch: the next epoch's order from its start. Lightning rebuilds the
    # iterator before it advances its epoch, so epoch_fn still says 1 here.
    epoch[0] = 2
    next_epoch = as_lists(number_loader(epoch))
    assert next_epoch != served + rest
    resumed = number_loader([1], num_workers)
    resumed.load_state_dict(complete)
    assert as_lists(resumed) == next_epoch
    assert as_lists(resumed) == as_lists(number_loader([1]))  # then epoch_fn again


def test_loader_refuses_a_position_in_an_epoch_of_another_length():
    loader = number_loader([0])
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    shorter = ResumableDataLoader(list(range(8)), sampler=EpochShuffleSampler(8), batch_size=4, epoch_fn=lambda: 0)
    with pytest.raises(ValueError, match=r"epoch of 5 batches.*now has 2 batches.*same data, batch size"):
        shorter.load_state_dict(state)


def arithmetic(batch_size=4, num_train=40, num_workers=0):
    datamodule = ArithmeticDataModule(
        num_train=num_train, num_val=4, batch_size=batch_size, seed=5, num_workers=num_workers
    )
    datamodule.setup("fit")
    return datamodule


def unpadded_rows(batch):
    return [tuple(ids[: int(mask.sum())].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def distributed_train_loader(datamodule, rank):
    """The datamodule's training loader as Lightning 2.6 rebuilds it under DDP (use_distributed_sampler):
    the same loader class with a DistributedSamplerWrapper around our sampler."""
    with _replace_dunder_methods(DataLoader, "dataset"):  # as Lightning's _request_dataloader does
        loader = datamodule.train_dataloader()
    sampler = _get_distributed_sampler(
        loader, shuffle=True, overfit_batches=0, mode=RunningStage.TRAINING, num_replicas=2, rank=rank, seed=0
    )
    rebuilt = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
    assert isinstance(rebuilt, ResumableDataLoader) and isinstance(rebuilt.batch_sampler.sampler, DistributedSampler)
    return rebuilt


def test_distributed_loader_resumes_exactly_in_lightnings_order():
    """Rank 0 of 2, in epoch 1: Lightning builds the iterator on resume before it calls set_epoch,
    and a fresh DistributedSamplerWrapper then still says epoch 0; the loader sets the epoch first."""
    datamodule = arithmetic(batch_size=8)
    datamodule._current_epoch = lambda: 1  # as if the trainer were in epoch 1

    straight = distributed_train_loader(datamodule, rank=0)
    _set_sampler_epoch(straight, 1)
    iterator = iter(straight)
    served = [digest(next(iterator)) for _ in range(2)]
    state = straight.state_dict()
    rest = [digest(batch) for batch in iterator]
    assert len(served + rest) == 3  # 20 of the 40 examples on each rank, in batches of 8

    resumed = distributed_train_loader(datamodule, rank=0)
    resumed.load_state_dict(state)
    iterator = iter(resumed)  # Lightning: iter() in setup_data, set_epoch later in on_advance_start
    _set_sampler_epoch(resumed, 1)
    assert [digest(batch) for batch in iterator] == rest

    # The two ranks split the epoch between them.
    shares = []
    for rank in (0, 1):
        loader = distributed_train_loader(datamodule, rank=rank)
        shares.append([row for batch in loader for row in unpadded_rows(batch)])
    assert len(shares[0]) == len(shares[1]) == 20
    assert sorted(shares[0] + shares[1]) == sorted(
        row for batch in datamodule.train_dataloader() for row in unpadded_rows(batch)
    )


# -- the loader inside a Trainer: every kind of checkpoint ----------------------------------------


class BatchRecorder(pl.LightningModule):
    """Trains one weight and records (epoch, batch index, batch digest) of every training batch.

    `reads_stepping_batches`: configure_optimizers reads trainer.estimated_stepping_batches, as
    HelloraModule does; Lightning then builds the training loader before restoring its state.
    """

    def __init__(self, reads_stepping_batches: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.reads_stepping_batches = reads_stepping_batches
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.trainer.current_epoch, batch_idx, digest(batch)))
        return self.weight * batch["input_ids"].float().mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        if self.reads_stepping_batches:
            assert self.trainer.estimated_stepping_batches == STEPS
        return torch.optim.SGD(self.parameters(), lr=0.1)


STEPS = 12  # 5 batches per epoch: epochs 0 and 1, and two batches of epoch 2


def trainer_fit(root, module, ckpt_path=None, callbacks=(), num_workers=0):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        max_epochs=10,  # with max_epochs, estimated_stepping_batches loads the training data
        limit_val_batches=1,  # validation at each epoch's end, as real runs have
        num_sanity_val_steps=0,
        logger=False,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    datamodule = arithmetic(batch_size=4, num_train=20, num_workers=num_workers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.seen


@pytest.fixture(scope="module")
def straight_with_checkpoints(tmp_path_factory):
    """One uninterrupted fit that checkpoints after every step and at every epoch's end."""
    root = tmp_path_factory.mktemp("straight")
    every_step = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    epoch_end = ModelCheckpoint(
        dirpath=root, every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1, filename="end-{epoch}"
    )
    seen = trainer_fit(root, BatchRecorder(True), callbacks=[every_step, epoch_end])
    assert len(seen) == STEPS and len({d for _, _, d in seen[:5]} & {d for _, _, d in seen[5:10]}) == 0
    return root, seen


@pytest.mark.parametrize("reads_stepping_batches", [True, False])
@pytest.mark.parametrize(
    "checkpoint, done",
    [
        ("step=3.ckpt", 3),  # inside epoch 0
        ("step=7.ckpt", 7),  # inside epoch 1
        ("step=5.ckpt", 5),  # after epoch 0's last batch (on_train_batch_end)
        ("end-epoch=0.ckpt", 5),  # at epoch 0's end (on_train_epoch_end)
    ],
)
def test_trainer_resumes_the_datamodules_batches_exactly(
    straight_with_checkpoints, tmp_path, checkpoint, done, reads_stepping_batches
):
    root, straight = straight_with_checkpoints
    resumed = trainer_fit(tmp_path, BatchRecorder(reads_stepping_batches), ckpt_path=root / checkpoint)
    assert resumed == straight[done:]


def test_trainer_resumes_with_worker_processes(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=7, filename="{step}")
    straight = trainer_fit(tmp_path, BatchRecorder(True), callbacks=[checkpoints], num_workers=2)
    resumed = trainer_fit(tmp_path / "resumed", BatchRecorder(True), ckpt_path=tmp_path / "step=7.ckpt", num_workers=2)
    assert resumed == straight[7:]
    with pytest.raises(
        ValueError, match=r"inside an epoch.*changed since: num_workers 2 -> 0\. .*Resume with the same"
    ):
        trainer_fit(tmp_path / "other", BatchRecorder(True), ckpt_path=tmp_path / "step=7.ckpt", num_workers=0)


# -- the CLI: SIGKILL after a mid-epoch checkpoint, resume, compare every later loss ------------

PROBE = '''
"""Test callbacks for tests/test_exact_resume.py, put on PYTHONPATH by the test."""
import hashlib
import json
import os
import signal

from lightning.pytorch import Callback


class RecordTrainLosses(Callback):
    """Appends one JSON line per training batch: epoch, batch index, global step, data digest, loss."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {
            "epoch": trainer.current_epoch,
            "batch": batch_idx,
            "step": trainer.global_step,
            "data": hashlib.sha1(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:12],
            "loss": float(outputs["loss"]),
        }
        with open(self.path, "a") as out:
            out.write(json.dumps(row) + "\\n")


class KillAfterStep(Callback):
    """SIGKILLs its own process once the trainer has taken `step` optimizer steps: nothing is saved on exit."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def probe_callback(name: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"exact_resume_probe.{name}", "init_args": init_args})


def start_fit(tmp_path, name, args, extra=()):
    """`python -m hellora_pl fit` in its own folder, recording its training losses to `<name>.jsonl`."""
    root = tmp_path / name
    root.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # the same thread count in every run: float sums then agree bit for bit
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "hellora_pl", "fit", *args,
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        probe_callback("RecordTrainLosses", path=str(root / "losses.jsonl")),
        *extra,
    ]  # fmt: skip
    log = open(root / "output.txt", "w")
    process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    return root, process


def finish(root, process, expected_returncode=0):
    returncode = process.wait(timeout=600)
    output = (root / "output.txt").read_text()
    assert returncode == expected_returncode, output[-4000:]
    return [json.loads(line) for line in (root / "losses.jsonl").read_text().splitlines()]


def killed_resumed_and_straight(tmp_path, args, checkpoint_step, accumulate=1):
    """An uninterrupted fit, and the same fit SIGKILLed one step after its step-`checkpoint_step`
    checkpoint (last.ckpt), then resumed from it with --ckpt_path. Returns their rows (one per batch)."""
    (tmp_path / "exact_resume_probe.py").write_text(PROBE)
    straight = start_fit(tmp_path, "straight", args)  # the two run side by side, one thread each
    killed = start_fit(tmp_path, "killed", args, [probe_callback("KillAfterStep", step=checkpoint_step + 1)])
    straight_rows = finish(*straight)
    killed_rows = finish(*killed, expected_returncode=-signal.SIGKILL)
    (checkpoint,) = killed[0].rglob("last.ckpt")
    assert torch.load(checkpoint, weights_only=False)["global_step"] == checkpoint_step
    resumed_rows = finish(*start_fit(tmp_path, "resumed", [*args, f"--ckpt_path={checkpoint}"]))

    assert killed_rows == straight_rows[: len(killed_rows)] and killed_rows[-1]["step"] == checkpoint_step + 1
    done = checkpoint_step * accumulate  # batches trained before the checkpoint
    batches_per_epoch = max(row["batch"] for row in straight_rows) + 1
    assert done % batches_per_epoch != 0, "the checkpoint must fall inside an epoch"
    assert len(resumed_rows) == len(straight_rows) - done > 0
    return straight_rows[done:], resumed_rows


QUICKSTART = [
    f"--config={REPO / 'configs' / 'quickstart.yaml'}",
    "--data.init_args.num_train=96",  # 6 batches of 16 per epoch
    "--data.init_args.num_val=8",
    "--trainer.val_check_interval=4",  # validation, and so a checkpoint, every 4 batches
]


def test_quickstart_resumes_mid_epoch_exactly(tmp_path):
    # Checkpoint at step 8 = epoch 1, batch 2 of 6; then on into epoch 2.
    expected, resumed = killed_resumed_and_straight(tmp_path, [*QUICKSTART, "--trainer.max_steps=14"], 8)
    assert resumed == expected  # data digests and train losses, exactly
    assert resumed[0]["epoch"] == 1 and resumed[-1]["epoch"] == 2


def packed_twin(config, *overrides):
    return [
        f"--config={REPO / 'configs' / 'tiny' / 'olmoe' / config}",
        "--data.init_args.packing=true",
        "--data.init_args.val_size=4",
        *overrides,
    ]


def test_packed_shared_data_twin_resumes_mid_epoch_exactly(tmp_path, shared_data):
    """The safety twin, packed, on its slice of ../shared/data."""
    args = packed_twin(
        "hellora_safety.yaml",
        "--data.init_args.train.limit=60",
        "--data.init_args.max_length=256",
        "--trainer.val_check_interval=3",
        "--trainer.max_steps=8",
    )
    expected, resumed = killed_resumed_and_straight(tmp_path, args, 3)
    assert resumed == expected


def test_packed_data_with_gradient_accumulation_resumes_mid_epoch_exactly(tmp_path):
    """The math twin, packed, on GSM8K-style rows the test writes (no ../shared needed), with
    accumulate_grad_batches 2: 56 rows pack into 27 sequences, 7 batches of 4 per epoch."""
    for name, count in (("train", 60), ("test", 2)):
        rows = generate_arithmetic_problems(count, seed=len(name))
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = packed_twin(
        "hellora_math.yaml",
        f"--data.init_args.train.path={tmp_path / 'train.jsonl'}",
        f"--data.init_args.benchmark.path={tmp_path / 'test.jsonl'}",
        "--data.init_args.max_length=384",
        "--trainer.accumulate_grad_batches=2",
        "--trainer.val_check_interval=4",  # batches: a checkpoint every 2 steps
        "--trainer.max_steps=6",
    )
    # Checkpoint at step 2 = batch 4 of epoch 0's 7; then on into epoch 1.
    expected, resumed = killed_resumed_and_straight(tmp_path, args, 2, accumulate=2)
    assert resumed == expected
    assert len({row["step"] for row in resumed}) < len(resumed)  # steps of two batches were resumed
    assert resumed[0]["epoch"] == 0 and resumed[-1]["epoch"] == 1
