"""Benchmarks as evaluation tasks: their problems, prompts, scoring and torchmetrics metric.

A datamodule exposes one task as `eval_task`; `HelloraModule` generates completions for its
prompts during validate/test, calls `score` (which runs generated code only through the
sandbox, in other processes) and `update`, and logs `compute()` of the metric at epoch end.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import torchmetrics

from hellora_pl.evaluation.code import (
    HUMANEVAL_STOP,
    extract_code,
    humaneval_program,
    mbpp_program,
    mbpp_prompt,
)
from hellora_pl.evaluation.math import GSM8K_STOP, gold_answer, score_math
from hellora_pl.evaluation.metrics import GSM8KAccuracy, PassAtK, RefusalRate
from hellora_pl.evaluation.refusal import HarmfulPrompt, KeywordJudge, RefusalJudge
from hellora_pl.evaluation.sandbox import SandboxLimits, run_programs

Record = dict[str, Any]


class EvalTask(ABC):
    """`name` prefixes the logged metrics (e.g. `test/gsm8k/strict`)."""

    name: str
    default_stop: tuple[str, ...] = ()
    templated: bool = True  # False: the prompt is raw text given to the model as is (code completion)

    def __len__(self) -> int:
        return len(self.problems)

    @property
    @abstractmethod
    def problems(self) -> Sequence[Any]: ...

    @abstractmethod
    def instruction(self, index: int) -> str:
        """The instruction for problem `index`, rendered by the datamodule's prompt template."""

    @abstractmethod
    def new_metric(self) -> torchmetrics.Metric: ...

    @abstractmethod
    def score(self, indices: Sequence[int], completions: Sequence[Sequence[str]]) -> list[Record]:
        """One JSON-able record per problem, holding its completions and their judgement."""

    @abstractmethod
    def update(self, metric: torchmetrics.Metric, records: Sequence[Record]) -> None: ...

    def evaluated(self, limit: int | None) -> list[int]:
        """The problems evaluated under an `eval_limit` of `limit` (None: all): the first `limit`."""
        return list(range(len(self) if limit is None else min(limit, len(self))))


class MathTask(EvalTask):
    """GSM8K-style problems (`question`, `answer` ending in `#### N`), scored strict and flexible.

    Generation stops where lm-eval's gsm8k task stops it (a new "Question:", "</s>", "<|im_end|>").
    """

    default_stop = GSM8K_STOP

    def __init__(self, problems: Sequence[dict[str, str]], name: str = "gsm8k"):
        self.name = name
        self._problems = list(problems)
        self.golds = [gold_answer(problem["answer"]) for problem in self._problems]

    @property
    def problems(self):
        return self._problems

    def instruction(self, index: int) -> str:
        return self._problems[index]["question"]

    def new_metric(self) -> torchmetrics.Metric:
        return GSM8KAccuracy()

    def score(self, indices, completions):
        records = []
        for index, samples in zip(indices, completions):
            scores = [score_math(text, self.golds[index]) for text in samples]
            records.append(
                {
                    "index": index,
                    "question": self._problems[index]["question"],
                    "gold": self.golds[index],
                    "completions": list(samples),
                    "strict_answer": [s.strict_answer for s in scores],
                    "flexible_answer": [s.flexible_answer for s in scores],
                    "strict": [s.strict for s in scores],
                    "flexible": [s.flexible for s in scores],
                }
            )
        return records

    def update(self, metric, records):
        metric.update([ok for r in records for ok in r["strict"]], [ok for r in records for ok in r["flexible"]])


class CodeTask(EvalTask):
    """HumanEval or MBPP, scored by pass@k with each program run in the sandbox.

    `prompt_style`: `completion` gives HumanEval's prompt to the model as raw text and cuts the
    continuation at the Codex stop strings; `instruction` asks for the function in the training
    template and takes the first fenced code block of the answer. MBPP is always `instruction`.
    """

    def __init__(
        self,
        benchmark: Literal["humaneval", "mbpp"],
        problems: Sequence[dict[str, Any]],
        ks: Sequence[int],
        prompt_style: Literal["completion", "instruction"] = "instruction",
        limits: SandboxLimits | None = None,
        workers: int = 4,
    ):
        if benchmark not in ("humaneval", "mbpp"):
            raise ValueError(f"Unknown code benchmark {benchmark!r}; choose 'humaneval' or 'mbpp'.")
        if prompt_style not in ("completion", "instruction"):
            raise ValueError(f"prompt_style must be 'completion' or 'instruction', got {prompt_style!r}.")
        if benchmark == "mbpp" and prompt_style == "completion":
            raise ValueError("MBPP is prompted as an instruction; use prompt_style: instruction.")
        self.name = benchmark
        self._problems = list(problems)
        self.ks = tuple(ks)
        self.prompt_style = prompt_style
        self.templated = prompt_style == "instruction"
        self.default_stop = HUMANEVAL_STOP if prompt_style == "completion" else ()
        self.limits = limits or SandboxLimits()
        self.workers = workers

    @property
    def problems(self):
        return self._problems

    def instruction(self, index: int) -> str:
        problem = self._problems[index]
        if self.name == "mbpp":
            return mbpp_prompt(problem)
        if self.prompt_style == "completion":
            return problem["prompt"]
        return (
            "Complete the following Python function. Answer with the whole function in a Python code block.\n\n"
            f"```python\n{problem['prompt']}```"
        )

    def program(self, index: int, completion: str) -> str:
        problem = self._problems[index]
        if self.name == "mbpp":
            return mbpp_program(problem, extract_code(completion))
        if self.prompt_style == "completion":
            return humaneval_program(problem, completion)
        code = extract_code(completion)
        if re.search(rf"^def {re.escape(problem['entry_point'])}\s*\(", code, flags=re.MULTILINE):
            # A whole function: keep the prompt's imports and helpers, give its stub a body, redefine.
            code = "    pass\n\n" + code
        return humaneval_program(problem, code)

    def new_metric(self) -> torchmetrics.Metric:
        return PassAtK(self.ks)

    def score(self, indices, completions):
        jobs = [(index, text) for index, samples in zip(indices, completions) for text in samples]
        results = run_programs([self.program(index, text) for index, text in jobs], self.limits, self.workers)
        records, position = [], 0
        for index, samples in zip(indices, completions):
            outcome = results[position : position + len(samples)]
            position += len(samples)
            records.append(
                {
                    "index": index,
                    "task_id": self._problems[index]["task_id"],
                    "completions": list(samples),
                    "passed": [r.passed for r in outcome],
                    "status": [r.status for r in outcome],  # passed/failed/timeout/...: a timeout is not "failed"
                    "reason": [r.reason for r in outcome],
                    "num_correct": sum(r.passed for r in outcome),
                    "num_timeouts": sum(r.status == "timeout" for r in outcome),
                }
            )
        return records

    def update(self, metric, records):
        metric.update(
            [len(r["completions"]) for r in records],
            [r["num_correct"] for r in records],
            [r["num_timeouts"] for r in records],
        )


class RefusalTask(EvalTask):
    """Harmful instructions, and optionally benign ones; the judge (keywords by default) says which
    responses refuse.

    Refusing a harmful instruction counts towards `refusal_rate`; refusing a `benign` one towards
    `over_refusal_rate` (a model that refuses everything scores 1 on both). Problems are the harmful
    prompts, then the benign ones; an `eval_limit` takes the first N of each.
    """

    def __init__(
        self,
        prompts: Sequence[HarmfulPrompt],
        judge: RefusalJudge | None = None,
        name: str = "refusal",
        benign: Sequence[HarmfulPrompt] | None = None,
    ):
        self.name = name
        self.num_harmful = len(prompts)
        self._problems = list(prompts) + list(benign or [])
        self.judge = judge or KeywordJudge()
        self.categories = sorted({prompt.category for prompt in prompts})
        self.benign_categories = sorted({prompt.category for prompt in benign or []})

    @property
    def problems(self):
        return self._problems

    def is_benign(self, index: int) -> bool:
        return index >= self.num_harmful

    def evaluated(self, limit: int | None) -> list[int]:
        harmful = list(range(self.num_harmful))
        benign = list(range(self.num_harmful, len(self._problems)))
        return harmful + benign if limit is None else harmful[:limit] + benign[:limit]

    def instruction(self, index: int) -> str:
        return self._problems[index].instruction

    def new_metric(self) -> torchmetrics.Metric:
        return RefusalRate(self.categories, self.benign_categories)

    def score(self, indices, completions):
        instructions = [self._problems[i].instruction for i, samples in zip(indices, completions) for _ in samples]
        verdicts = list(self.judge(instructions, [text for samples in completions for text in samples]))
        records, position = [], 0
        for index, samples in zip(indices, completions):
            refused = [bool(v) for v in verdicts[position : position + len(samples)]]
            position += len(samples)
            prompt = self._problems[index]
            records.append(
                {
                    "index": index,
                    "category": prompt.category,
                    "benign": self.is_benign(index),
                    "instruction": prompt.instruction,
                    "completions": list(samples),
                    "refused": refused,
                }
            )
        return records

    def update(self, metric, records):
        metric.update(
            [r["category"] for r in records for _ in r["refused"]],
            [v for r in records for v in r["refused"]],
            [r["benign"] for r in records for _ in r["refused"]],
        )
