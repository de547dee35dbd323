import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `datasets` caches every file it reads under ~/.cache/huggingface/datasets: shared by every run of the
# suite on the machine (two at once write the same entries) and growing with each run's tmp_path files.
# This session's own folder, removed at exit; subprocesses inherit it. Set before `datasets` is imported.
_DATASETS_CACHE = tempfile.TemporaryDirectory(prefix="hellora-tests-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE.name

from hellora_pl.adapters.experts import expert_adapter  # noqa: E402
from hellora_pl.backbones import BackboneConfig  # noqa: E402
from hellora_pl.backbones.tiny import TINY_CONFIGS  # noqa: E402
from hellora_pl.datamodules import EpochShuffleSampler  # noqa: E402
from hellora_pl.loading import load_backbone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def today_twins() -> dict:
    """configs/generate.py's TODAY_TWINS (the tiny twins of today's real configs), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("configs_generate_twins", REPO / "configs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TODAY_TWINS

TINY_OLMOE = TINY_CONFIGS["olmoe"][1]

# Public data files beside the checkout (../shared/data); tests that read them skip when absent.
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (the public data files live beside the checkout)")
    return SHARED_DATA


def tiny_olmoe(seed: int = 0, **overrides):
    return load_backbone(BackboneConfig(model_type="olmoe", config={**TINY_OLMOE, **overrides}, seed=seed))


def naive_experts_forward(experts, hidden, top_k_index, top_k_weights):
    """Oracle of the adapted expert path: loop over (token, k), each hot expert's weights W + scale * B_eff A.

    Free of grouped_mm's 16-byte stride rule, so sizes can be prime.
    """
    lora = expert_adapter(experts)
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            w_gu, w_d = experts.gate_up_proj[e], experts.down_proj[e]
            if lora is not None and int(lora.slot_of_expert[e]) >= 0:
                s = int(lora.slot_of_expert[e])
                w_gu = w_gu + lora.scale * lora.effective_B("gate_up_proj")[s] @ lora.lora_A["gate_up_proj"][s]
                w_d = w_d + lora.scale * lora.effective_B("down_proj")[s] @ lora.lora_A["down_proj"][s]
            gate, up = (w_gu @ hidden[t]).chunk(2)
            out[t] += top_k_weights[t, j] * (w_d @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.fixture
def model():
    return tiny_olmoe()


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, TINY_OLMOE["vocab_size"], (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class RandomTokens(pl.LightningDataModule):
    """Fixed random token batches, shuffled per epoch by (seed, epoch)."""

    def __init__(self, num_batches=4, batch_size=2, length=10):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.examples = []
        for _ in range(num_batches * batch_size):
            ids = torch.randint(3, TINY_OLMOE["vocab_size"], (length,), generator=generator)
            labels = ids.clone()
            labels[:4] = -100  # prompt
            self.examples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        self.batch_size = batch_size

    def _current_epoch(self):
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self):
        return DataLoader(
            self.examples,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.examples), epoch_fn=self._current_epoch),
        )

    def val_dataloader(self):
        return DataLoader(self.examples[:4], batch_size=self.batch_size)


def make_trainer(root, max_steps, callbacks, version=0, **kwargs):
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=TensorBoardLogger(root, name="run", version=version),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        deterministic=True,
        **kwargs,
    )


def tiny_twin_cli(config: Path, root: Path, *overrides: str):
    """The CLI set up (not run) for a tiny twin config: 3 steps, small data, logs under `root`.

    Any working directory will do: the twins name their data relative to the config file.
    """
    from hellora_pl.cli import HelloraCLI
    from hellora_pl.module import HelloraModule

    return HelloraCLI(
        HelloraModule,
        subclass_mode_data=True,
        run=False,
        args=[
            "--config", str(config), *overrides,
            "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            "--data.init_args.train.limit=48", "--data.init_args.val_size=8",
        ],
    )  # fmt: skip


# Plans from different process layouts or machines: plan.json's gate_mass is a float sum of routing
# weights (float32, summed in float64, rounded to 6 decimals). Another thread count, SIMD width or
# reduction order moves each weight by a few float32 ulps (measured: 2.8e-7 on a sum of 3.1), and the
# rounding can then flip the 6th decimal (3.115729 vs 3.11573). rtol 1e-5 is ~100x that drift; atol
# 2e-6 covers one flipped last digit. A token routed elsewhere moves a count, compared exactly.
PLAN_RTOL, PLAN_ATOL = 1e-5, 2e-6


def assert_plans_match(got, want, rtol: float = PLAN_RTOL, atol: float = PLAN_ATOL) -> None:
    """Two AdapterPlans field by field: every float within (rtol, atol), everything else exactly."""
    mismatches: list[str] = []
    _compare_fields(got.to_dict(), want.to_dict(), "plan", rtol, atol, mismatches)
    assert not mismatches, "plans differ:\n  " + "\n  ".join(mismatches)


def _compare_fields(got, want, where: str, rtol: float, atol: float, mismatches: list[str]) -> None:
    if isinstance(got, dict) and isinstance(want, dict):
        if got.keys() != want.keys():
            mismatches.append(f"{where}: keys {sorted(got)} != {sorted(want)}")
            return
        for key in got:
            _compare_fields(got[key], want[key], f"{where}.{key}", rtol, atol, mismatches)
    elif isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            mismatches.append(f"{where}: {len(got)} items != {len(want)}: {got} != {want}")
            return
        for index, (a, b) in enumerate(zip(got, want)):
            _compare_fields(a, b, f"{where}[{index}]", rtol, atol, mismatches)
    elif isinstance(got, float) or isinstance(want, float):
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (got, want))
        if not (numbers and math.isclose(got, want, rel_tol=rtol, abs_tol=atol)):
            mismatches.append(f"{where}: {got!r} != {want!r} (rtol {rtol}, atol {atol})")
    elif type(got) is not type(want) or got != want:
        mismatches.append(f"{where}: {got!r} != {want!r}")


@contextmanager
def private_rendezvous() -> Iterator[dict[str, str]]:
    """The environment for ONE multi-process run (gloo, env://) whose rendezvous store this process hosts.

    Lightning picks MASTER_PORT by binding port 0, closing it and letting rank 0 bind it again later:
    another suite running beside this one can take the port in between. Here the store binds port 0
    and holds it until the run is over, so no one else can; TORCHELASTIC_USE_AGENT_STORE makes every
    rank connect to it as a client (torch.distributed.rendezvous). A store serves one run: the next
    run's ranks would read the last one's keys, so each run takes a fresh one.
    """
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(minutes=5))
    try:
        yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    finally:
        del store
