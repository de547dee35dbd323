"""Evaluation metrics as torchmetrics ``Metric``s, so results stay exact under DDP.

Each rank evaluates its own shard; the states are counts (or sums of per-problem estimates) reduced
with ``dist_reduce_fx="sum"``, so ``compute()`` on every rank gives the value over the whole set,
whatever the shard sizes. No state depends on earlier batches, hence ``full_state_update=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchmetrics
from torch import Tensor

from hellora_pl.evaluation.code import pass_at_k


def _as_tensor(values: Tensor | Sequence, dtype: torch.dtype, name: str) -> Tensor:
    """A flat tensor of ``dtype`` from a list or a tensor; fractional input is a caller bug, so refuse it."""
    tensor = values if isinstance(values, Tensor) else torch.tensor(list(values))
    if tensor.numel() == 0:
        return torch.zeros(0, dtype=dtype)
    if tensor.is_floating_point():
        raise ValueError(f"{name} must hold integers or booleans, got {tensor.dtype}")
    return tensor.detach().cpu().flatten().to(dtype)


def _same_length(**named: Tensor) -> None:
    """Raise when paired per-example inputs differ in length."""
    lengths = {name: tensor.numel() for name, tensor in named.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs differ in length: {lengths}")


class GSM8KAccuracy(torchmetrics.Metric):
    """Accuracy under lm-eval's two GSM8K extractions ("strict" and "flexible")."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("strict_correct", "flexible_correct", "total"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, strict: Tensor | Sequence[bool], flexible: Tensor | Sequence[bool]) -> None:
        strict_t = _as_tensor(strict, torch.bool, "strict")
        flexible_t = _as_tensor(flexible, torch.bool, "flexible")
        _same_length(strict=strict_t, flexible=flexible_t)
        self.strict_correct += strict_t.sum().to(self.total.device)
        self.flexible_correct += flexible_t.sum().to(self.total.device)
        self.total += strict_t.numel()

    def compute(self) -> dict[str, Tensor]:
        total = self.total.double()
        return {"strict": self.strict_correct / total, "flexible": self.flexible_correct / total}


class PassAtK(torchmetrics.Metric):
    """Mean unbiased pass@k over problems, for several k at once, and how many samples timed out.

    A timeout is counted apart from a failure: a correct program that a loaded machine cuts off at the
    wall clock lowers pass@k just as a wrong one does, and ``timeouts`` / ``timeout_rate`` (per sample)
    say how much of the score that was. pass@k itself does not depend on them.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, ks: Sequence[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = _check_ks(ks)
        self.add_state("pass_sum", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("timeouts", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        num_samples: Tensor | Sequence[int],
        num_correct: Tensor | Sequence[int],
        num_timeouts: Tensor | Sequence[int],
    ) -> None:
        """Per problem: samples drawn, samples that passed, samples stopped by the time limit."""
        n_t = _as_tensor(num_samples, torch.long, "num_samples")
        c_t = _as_tensor(num_correct, torch.long, "num_correct")
        t_t = _as_tensor(num_timeouts, torch.long, "num_timeouts")
        _same_length(num_samples=n_t, num_correct=c_t, num_timeouts=t_t)
        triples = list(zip(n_t.tolist(), c_t.tolist(), t_t.tolist()))
        for index, (n, c, t) in enumerate(triples):
            self._check_problem(index, n, c, t)
        estimates = [[pass_at_k(n, c, k) for k in self.ks] for n, c, _ in triples]
        if estimates:
            self.pass_sum += torch.tensor(estimates, dtype=torch.float64, device=self.pass_sum.device).sum(0)
        self.problems += len(triples)
        self.samples += sum(n for n, _, _ in triples)
        self.timeouts += sum(t for _, _, t in triples)

    def _check_problem(self, index: int, n: int, c: int, t: int) -> None:
        """Reject counts the estimator is undefined for, before any state changes."""
        if not 0 <= c <= n:
            raise ValueError(f"problem {index} of the batch: num_correct={c} must lie in [0, num_samples={n}]")
        if not 0 <= t <= n - c:
            raise ValueError(
                f"problem {index} of the batch: num_timeouts={t} must lie in [0, num_samples - num_correct={n - c}]"
                " (a sample that timed out did not pass)"
            )
        if max(self.ks) > n:
            raise ValueError(
                f"pass@{max(self.ks)} needs at least {max(self.ks)} samples per problem, but problem {index} "
                f"of the batch has num_samples={n}; sample more or drop that k"
            )

    def compute(self) -> dict[str, Tensor]:
        means = self.pass_sum / self.problems.double()
        result = {f"pass@{k}": means[i] for i, k in enumerate(self.ks)}
        result["timeouts"] = self.timeouts.double()  # float so loggers reduce it without a dtype warning
        result["timeout_rate"] = self.timeouts.double() / self.samples.double()
        return result


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Positive, distinct k values (distinct so the result keys do not collide)."""
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
        raise ValueError(f"ks must be distinct positive integers, got {ks}")
    return ks


def _category_position(category: str, index: dict[str, int], kind: str) -> int:
    """Position of ``category`` in its declared list (`index` keeps the declared order), known ones named on a miss."""
    if category not in index:
        raise ValueError(f"unknown {kind} category {category!r}; declared: {list(index)}")
    return index[category]


class RefusalRate(torchmetrics.Metric):
    """Fraction of harmful prompts refused, overall and per category; with `benign_categories`, also
    the over-refusal rate: the fraction of benign prompts refused (lower is better), overall and per
    benign category.

    The two sets are counted apart (a benign category may share a harmful one's name), so
    `refusal_rate` is over harmful prompts only and `over_refusal_rate` over benign ones only.
    """

    full_state_update = False
    higher_is_better = True  # of refusal_rate; over_refusal_rate is better lower
    is_differentiable = False

    def __init__(self, categories: Sequence[str], benign_categories: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.categories = tuple(categories)
        self.benign_categories = tuple(benign_categories)
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories must be distinct and non-empty, got {self.categories}")
        if len(set(self.benign_categories)) != len(self.benign_categories):
            raise ValueError(f"benign categories must be distinct, got {self.benign_categories}")
        self._index = {category: i for i, category in enumerate(self.categories)}
        self._benign_index = {category: i for i, category in enumerate(self.benign_categories)}
        for prefix, size in (("", len(self.categories)), ("benign_", len(self.benign_categories))):
            self.add_state(f"{prefix}refused", default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{prefix}total", default=torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        categories: Sequence[str],
        refused: Tensor | Sequence[bool],
        benign: Tensor | Sequence[bool] | None = None,
    ) -> None:
        """Per response: its prompt's category, whether it refused, and (with benign categories declared)
        whether the prompt was benign; `benign` None means every prompt was harmful."""
        refused_t = _as_tensor(refused, torch.bool, "refused").cpu()
        benign_t = (
            torch.zeros(len(categories), dtype=torch.bool)
            if benign is None
            else _as_tensor(benign, torch.bool, "benign").cpu()
        )
        _same_length(categories=torch.zeros(len(categories)), refused=refused_t, benign=benign_t)
        sets = (
            (~benign_t, self._index, "refusal", self.total, self.refused),
            (benign_t, self._benign_index, "benign", self.benign_total, self.benign_refused),
        )
        # every category is checked before any count changes, so a bad update leaves the state as it was
        positions = [
            [_category_position(c, index, kind) for c, p in zip(categories, picked.tolist()) if p]
            for picked, index, kind, _, _ in sets
        ]
        for (picked, index, _, total, refused_count), rows in zip(sets, positions):
            if rows:
                rows_t = torch.tensor(rows, dtype=torch.long)
                total += torch.bincount(rows_t, minlength=len(index)).to(total.device)  # the states, in place
                refused_count += torch.bincount(rows_t[refused_t[picked]], minlength=len(index)).to(total.device)

    def compute(self) -> dict[str, Tensor]:
        result = {"refusal_rate": self.refused.sum().double() / self.total.sum().double()}
        for i, category in enumerate(self.categories):
            if self.total[i] > 0:
                result[f"refusal_rate/{category}"] = self.refused[i].double() / self.total[i].double()
        if self.benign_categories:
            result["over_refusal_rate"] = self.benign_refused.sum().double() / self.benign_total.sum().double()
            for i, category in enumerate(self.benign_categories):
                if self.benign_total[i] > 0:
                    result[f"over_refusal_rate/{category}"] = (
                        self.benign_refused[i].double() / self.benign_total[i].double()
                    )
        return result
