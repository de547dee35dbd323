"""GSM8K answer extraction and scoring (lm-eval's strict-match / flexible-extract + exact_match)."""

from __future__ import annotations

import json

import pytest

from hellora_pl.datamodules import DataSource, MathDataModule
from hellora_pl.evaluation.math import (
    GSM8K_STOP,
    INVALID,
    MathScore,
    extract_flexible,
    extract_strict,
    gold_answer,
    is_correct,
    normalize,
    score_math,
)
from hellora_pl.evaluation.tasks import MathTask

# Measured on the shared copies of openai/grade-school-math: every reference answer scores correct
# against itself under both extractions (its last number is always the "#### N" line).
GSM8K_COUNTS = {"test": (1319, 1319, 1319), "train": (7473, 7473, 7473)}  # rows, strict, flexible


@pytest.mark.parametrize("split", ["test", "train"])
def test_reference_answers_score_correct(shared_data, split):
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
    strict = flexible = 0
    for row in rows:
        independent = row["answer"].splitlines()[-1].split("#### ")[1].replace(",", "").strip()
        assert gold_answer(row["answer"]) == independent
        score = score_math(row["answer"], row["answer"])
        assert score_math(row["answer"], independent) == score
        strict += score.strict
        flexible += score.flexible
    assert (len(rows), strict, flexible) == GSM8K_COUNTS[split]


def test_gold_answer_normalizes_and_requires_marker():
    assert gold_answer("Work.\nMore work.\n#### 1,000") == "1000"
    assert gold_answer("#### -7") == "-7"
    with pytest.raises(ValueError, match="no '#### ' line"):
        gold_answer("The total is 12.")
    with pytest.raises(ValueError, match="nothing after"):
        gold_answer("steps\n#### ")


def test_negative_numbers():
    assert extract_strict("so the change is\n#### -15") == "-15"
    assert score_math("The balance ends at -15 dollars.", "#### -15").flexible
    assert not is_correct("15", "-15")


def test_dollars_commas_and_trailing_period_are_ignored():
    assert normalize("$1,234.") == "1234"
    assert score_math("She pays $1,234.", "1234").flexible
    assert extract_flexible("She pays $1,234.") == "$1,234."
    assert is_correct("#### 1,234", "1234")


def test_metamath_answer_form():
    completion = "Step one... so 6 * 7 = 42.\nThe answer is: 42"
    assert extract_strict(completion) == "42"
    assert score_math(completion, "#### 42") == MathScore(True, True, "42", "42")
    assert extract_strict("The answer is: $1,500.") == "1,500."
    assert is_correct(extract_strict("The answer is: $1,500."), "1500")
    # the last "The answer is" wins, as in MetaMath's eval_gsm8k.py; "#### N" wins over both
    assert extract_strict("The answer is: 3\nWait.\nThe answer is: 4") == "4"
    assert extract_strict("The answer is: 3\n#### 5") == "5"


def test_no_number_is_invalid():
    score = score_math("I do not know.", "#### 3")
    assert score == MathScore(False, False, INVALID, INVALID)
    assert not is_correct(INVALID, INVALID)


def test_strict_takes_first_marker_flexible_takes_last_number():
    completion = "#### 12\nActually, let me recheck.\n#### 13\nSo 13 apples in 2 baskets"
    assert extract_strict(completion) == "12"
    assert extract_flexible(completion) == "2"
    score = score_math(completion, "#### 12")
    assert (score.strict, score.flexible) == (True, False)


def test_flexible_prefers_the_non_empty_group_and_strips():
    assert extract_flexible("answer: 7") == "7"  # single digit: only the second group matches
    assert extract_flexible("costs 12 then 3.50 ") == "3.50"
    assert not is_correct(extract_flexible("costs 12 then 3.50 "), "3.5")  # string equality, as lm-eval


def test_case_is_ignored_like_lm_eval():
    assert normalize("  ABC. ") == "abc"


def test_strict_accepts_only_the_lm_eval_and_metamath_forms():
    # lm-eval strict is "#### N"; MetaMath's eval_gsm8k.py splits on "The answer is: " (colon and space).
    for loose in ("The answer is 42", "The answer is:42", "the answer is: 42", "Answer: 42", "####42"):
        assert extract_strict(loose) == INVALID, loose
        assert score_math(loose, "#### 42") == MathScore(False, True, INVALID, "42")
    assert extract_strict("The answer is:   42") == "42"  # MetaMath strips what follows the marker


def test_lm_eval_gsm8k_stop_strings():
    # lm_eval/tasks/gsm8k/gsm8k.yaml, generation_kwargs.until
    assert GSM8K_STOP == ("Question:", "</s>", "<|im_end|>")
    assert MathTask([{"question": "q", "answer": "#### 1"}]).default_stop == GSM8K_STOP


def test_math_datamodule_generation_stops_at_a_new_question(tmp_path):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"#### {2 * i}"} for i in range(3)]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dm = MathDataModule(tokenizer="builtin:char", template="plain", benchmark=DataSource(str(path)))
    dm.setup("test")
    assert dm.generation.stop == list(GSM8K_STOP)


@pytest.mark.parametrize("stop", GSM8K_STOP)
def test_scoring_ignores_what_follows_a_stop_string(stop):
    # The model answered 7, then rambled into a new question answered 9: lm-eval scores 7 under both.
    rambling = f"3 + 4 = 7\n#### 7\n\n{stop} What is 4 + 5?\nAnswer: 4 + 5 = 9\n#### 9"
    assert score_math(rambling, "#### 7") == MathScore(True, True, "7", "7")
    no_marker = f"3 + 4 = 7\n\n{stop} What is 4 + 5?\nAnswer: #### 9"
    assert score_math(no_marker, "#### 9") == MathScore(False, False, INVALID, "7")
    assert score_math(no_marker, "#### 9", stop=()) == MathScore(True, True, "9", "9")
