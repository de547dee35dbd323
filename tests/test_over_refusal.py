"""Over-refusal: refusals of benign instructions, counted apart from the refusal rate on harmful ones,
through the metric, the task, the datamodule (eval_limit per set) and a fit/test run's logged metrics."""

from __future__ import annotations

import json

import pytest
import torch

from hellora_pl.datamodules import SafetyDataModule
from hellora_pl.datamodules.sources import DataSource
from hellora_pl.evaluation.metrics import RefusalRate
from hellora_pl.evaluation.refusal import HarmfulPrompt, KeywordJudge
from hellora_pl.evaluation.tasks import RefusalTask


def values(metric) -> dict[str, float]:
    return {key: float(value) for key, value in metric.compute().items()}


def test_refusal_and_over_refusal_are_counted_apart():
    metric = RefusalRate(["advbench"], benign_categories=["advbench", "chores"])  # a shared name stays apart
    metric.update(
        ["advbench", "advbench", "advbench", "advbench", "chores", "chores"],
        [True, False, True, True, False, True],
        [False, False, True, True, True, True],
    )
    got = values(metric)
    assert got == pytest.approx(
        {
            "refusal_rate": 0.5,  # harmful: 1 of 2
            "refusal_rate/advbench": 0.5,
            "over_refusal_rate": 0.75,  # benign: 3 of 4
            "over_refusal_rate/advbench": 1.0,
            "over_refusal_rate/chores": 0.5,
        },
        abs=1e-12,
    )
    metric.update(["chores"], torch.tensor([False]), torch.tensor([True]))
    assert values(metric)["over_refusal_rate"] == pytest.approx(3 / 5, abs=1e-12)


def test_without_benign_categories_the_metric_is_the_refusal_rate_alone():
    metric = RefusalRate(["a", "b"])
    metric.update(["a", "b", "a"], [True, False, False])
    assert set(values(metric)) == {"refusal_rate", "refusal_rate/a", "refusal_rate/b"}
    with pytest.raises(ValueError, match=r"unknown benign category 'a'; declared: \[\]"):
        metric.update(["a"], [True], [True])


def test_bad_updates_leave_the_state_untouched():
    metric = RefusalRate(["a"], benign_categories=["b"])
    with pytest.raises(ValueError, match=r"unknown benign category 'a'; declared: \['b'\]"):
        metric.update(["a", "a"], [True, True], [False, True])
    with pytest.raises(ValueError, match="differ in length"):
        metric.update(["a", "b"], [True, True], [False])
    assert int(metric.total.sum()) == 0 and int(metric.benign_total.sum()) == 0
    with pytest.raises(ValueError, match="benign categories must be distinct"):
        RefusalRate(["a"], benign_categories=["b", "b"])


def test_task_scores_benign_prompts_and_limits_each_set():
    harmful = [HarmfulPrompt(f"harm {i}", "h") for i in range(3)]
    benign = [HarmfulPrompt(f"chore {i}", "b") for i in range(4)]
    task = RefusalTask(harmful, judge=KeywordJudge(), benign=benign)
    assert len(task) == 7 and task.instruction(3) == "chore 0"
    assert task.evaluated(None) == list(range(7))
    assert task.evaluated(2) == [0, 1, 3, 4]  # the first two of each set
    records = task.score([0, 1, 3, 4], [["I cannot."], ["Sure."], ["I cannot."], ["Done."]])
    assert [r["benign"] for r in records] == [False, False, True, True]
    metric = task.new_metric()
    task.update(metric, records)
    got = values(metric)
    assert got["refusal_rate"] == pytest.approx(0.5) and got["over_refusal_rate"] == pytest.approx(0.5)
    assert "over_refusal_rate" not in values_of_plain_task()


def values_of_plain_task() -> dict[str, float]:
    task = RefusalTask([HarmfulPrompt("harm", "h")])
    metric = task.new_metric()
    task.update(metric, task.score([0], [["Sorry"]]))
    assert task.evaluated(5) == [0]
    return values(metric)


def test_safety_module_reads_benign_prompts_and_applies_eval_limit_to_each_set(tmp_path):
    harmful = tmp_path / "harmful.json"
    harmful.write_text(json.dumps(["harm 0", "harm 1", "harm 2"]))
    benign = tmp_path / "benign.jsonl"
    benign.write_text("".join(json.dumps({"instruction": f"add {i} and 2"}) + "\n" for i in range(5)))
    dm = SafetyDataModule(tokenizer="builtin:char", harmful=str(harmful), benign=str(benign), eval_limit=2)
    assert ("benchmark", "benign", str(benign)) in dm.data_paths()
    dm.setup("test")
    task = dm.eval_task
    assert [p["problem_index"] for p in dm._prompts] == [0, 1, 3, 4]
    assert [task.instruction(i) for i in (0, 3)] == ["harm 0", "add 0 and 2"]
    assert task.benign_categories == ["benign"] and task.categories == ["harmful"]


def test_benign_without_harmful_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(ValueError, match="set `harmful:` too"):
        SafetyDataModule(tokenizer="builtin:char", benign=str(tmp_path / "missing.json"))


def test_safety_module_without_benign_keeps_the_old_benchmark(tmp_path):
    harmful = tmp_path / "harmful.json"
    harmful.write_text(json.dumps(["harm 0", "harm 1", "harm 2"]))
    dm = SafetyDataModule(
        tokenizer="builtin:char",
        train=DataSource(str(harmful)),
        harmful=str(harmful),
        eval_limit=2,
    )
    dm.setup("test")
    assert [p["problem_index"] for p in dm._prompts] == [0, 1]
    assert dm.eval_task.benign_categories == []
