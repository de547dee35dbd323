"""GSM8KAccuracy, PassAtK (with its timeout counts) and RefusalRate: hand-made values, and exactness under a
real 2-process DDP."""

from __future__ import annotations

from math import comb
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hellora_pl.evaluation.metrics import GSM8KAccuracy, PassAtK, RefusalRate

KS = (1, 2, 5)
CATEGORIES = ("category_1", "category_2", "category_3")

# One evaluation set split unevenly over two ranks; category_2 is seen by rank 0 only, category_3 by none.
STRICT = ([True, False, True, True], [False, True, False])
FLEXIBLE = ([True, True, True, False], [False, True, True])
NUM_SAMPLES = ([5, 10], [6, 8, 5])
NUM_CORRECT = ([0, 3], [6, 1, 5])
NUM_TIMEOUTS = ([2, 0], [0, 4, 0])  # 2 of rank 0's 15 samples time out, 4 of rank 1's 19
REFUSAL_CATEGORIES = (["category_1", "category_2", "category_1"], ["category_1", "category_1"])
REFUSED = ([True, False, False], [True, True])


def _metrics() -> tuple[GSM8KAccuracy, PassAtK, RefusalRate]:
    return GSM8KAccuracy(), PassAtK(KS), RefusalRate(CATEGORIES)


def _update(metrics, shards: range) -> dict[str, float]:
    """Update all three metrics with the given shards and return their merged results."""
    accuracy, pass_at_k, refusal = metrics
    for shard in shards:
        accuracy.update(STRICT[shard], torch.tensor(FLEXIBLE[shard]))
        pass_at_k.update(NUM_SAMPLES[shard], torch.tensor(NUM_CORRECT[shard]), NUM_TIMEOUTS[shard])
        refusal.update(REFUSAL_CATEGORIES[shard], REFUSED[shard])
    results = {**accuracy.compute(), **pass_at_k.compute(), **refusal.compute()}
    return {key: float(value) for key, value in results.items()}


def _ddp_worker(rank: int, world_size: int, folder: str) -> None:
    """One DDP rank: update, compute (which syncs), save what it saw.

    "split": each rank updates with its own shard. "idle": rank 0 takes both shards and rank 1 never
    updates, so a rank with no examples still joins the reduction and gets the full value.
    """
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
    try:
        seen = {
            "split": _update(_metrics(), range(rank, rank + 1)),
            "idle": _update(_metrics(), range(2) if rank == 0 else range(0)),
        }
        torch.save(seen, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_compute_equals_single_process_over_the_union(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    expected = _update(_metrics(), range(2))
    assert "refusal_rate/category_2" in expected and "refusal_rate/category_3" not in expected
    assert expected["timeouts"] == 6 and expected["timeout_rate"] == pytest.approx(6 / 34, abs=1e-12)
    assert _update(_metrics(), range(1)) != expected  # so a rank that skipped the sync would fail below
    for rank in range(2):
        for mode, seen in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert seen.keys() == expected.keys(), (rank, mode)
            for key, value in expected.items():
                assert seen[key] == pytest.approx(value, abs=1e-12), (rank, mode, key)


def test_empty_updates_change_nothing():
    metrics = _metrics()
    accuracy, pass_at_k, refusal = metrics
    accuracy.update([], torch.tensor([], dtype=torch.bool))
    pass_at_k.update([], [], [])
    refusal.update([], [])
    assert _update(metrics, range(2)) == _update(_metrics(), range(2))


def test_gsm8k_accuracy_values():
    metric = GSM8KAccuracy()
    metric.update([True, False, True, True], [True, True, True, False])
    metric.update(torch.tensor([False, True]), torch.tensor([0, 1]))
    result = metric.compute()
    assert result["strict"].item() == pytest.approx(4 / 6)
    assert result["flexible"].item() == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="differ in length"):
        metric.update([True], [True, False])
    with pytest.raises(ValueError, match="integers or booleans"):
        metric.update([0.5], [1.0])


def test_pass_at_k_values_and_errors():
    metric = PassAtK([1, 2])
    metric.update([5, 10], [1, 3], [0, 0])
    result = metric.compute()
    assert set(result) == {"pass@1", "pass@2", "timeouts", "timeout_rate"}
    assert result["pass@1"].item() == pytest.approx((1 / 5 + 3 / 10) / 2)
    assert result["pass@2"].item() == pytest.approx(
        ((1 - comb(4, 2) / comb(5, 2)) + (1 - comb(7, 2) / comb(10, 2))) / 2
    )
    with pytest.raises(
        ValueError, match=r"pass@2 needs at least 2 samples per problem, but problem 1 of the batch has num_samples=1"
    ):
        metric.update([3, 1], [1, 0], [0, 0])
    with pytest.raises(ValueError, match=r"num_correct=4 must lie in \[0, num_samples=3\]"):
        metric.update([3], [4], [0])
    assert metric.problems.item() == 2  # rejected batches leave the state untouched
    with pytest.raises(ValueError, match="distinct positive"):
        PassAtK([1, 1])
    with pytest.raises(ValueError, match="distinct positive"):
        PassAtK([0])


def test_pass_at_k_counts_timeouts_apart_from_failures():
    """Timeouts are reported per sample beside pass@k and do not change pass@k."""
    with_timeouts, without = PassAtK([1, 2]), PassAtK([1, 2])
    with_timeouts.update([5, 10], [1, 3], [4, 2])  # problem 0: 1 passed, 4 timed out; problem 1: 3 passed, 2 timed out
    without.update([5, 10], [1, 3], [0, 0])
    got, plain = with_timeouts.compute(), without.compute()
    for key in ("pass@1", "pass@2"):
        assert got[key].item() == plain[key].item()  # same float ops on the same counts: exact
    assert got["timeouts"].item() == 6 and plain["timeouts"].item() == 0
    assert got["timeout_rate"].item() == pytest.approx(6 / 15, abs=1e-12)
    assert plain["timeout_rate"].item() == 0.0
    with pytest.raises(ValueError, match=r"num_timeouts=3 must lie in \[0, num_samples - num_correct=2\]"):
        with_timeouts.update([3], [1], [3])
    with pytest.raises(ValueError, match="differ in length"):
        with_timeouts.update([3, 3], [1, 1], [0])
    assert with_timeouts.samples.item() == 15  # rejected batches leave the state untouched


def test_refusal_rate_values_and_errors():
    metric = RefusalRate(["a", "b", "c"])
    metric.update(["a", "b", "a", "a"], [True, False, False, True])
    result = {key: value.item() for key, value in metric.compute().items()}
    assert result == pytest.approx({"refusal_rate": 0.5, "refusal_rate/a": 2 / 3, "refusal_rate/b": 0.0})
    with pytest.raises(ValueError, match=r"unknown refusal category 'd'; declared: \['a', 'b', 'c'\]"):
        metric.update(["d"], [True])
    with pytest.raises(ValueError, match="differ in length"):
        metric.update(["a"], [True, False])
    with pytest.raises(ValueError, match="distinct and non-empty"):
        RefusalRate(["a", "a"])
