"""Seeded GSM8K-style arithmetic word problems and a Lightning datamodule over them."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from hellora_pl.datamodules.collate import tokenize_prompt_response
from hellora_pl.datamodules.loaders import LossLoaders
from hellora_pl.datamodules.tokenizer import load_tokenizer

PROMPT_TEMPLATE = "Question: {question}\nAnswer: "
NAMES = (("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Sam", "He"), ("Zoe", "She"), ("Max", "He"))
OBJECTS = ("apples", "pencils", "stickers", "marbles", "cookies", "books")
MAX_NUMBER = 20
MAX_FACTOR = 10
Problem = dict[str, str]


def _addition(rng: random.Random, name: str, pronoun: str, obj: str) -> Problem:
    a, b = rng.randint(1, MAX_NUMBER), rng.randint(1, MAX_NUMBER)
    return {
        "question": f"{name} has {a} {obj}. {pronoun} buys {b} more. How many {obj} does {name} have now?",
        "answer": f"{name} has {a} + {b} = {a + b} {obj}.\n#### {a + b}",
    }


def _subtraction(rng: random.Random, name: str, pronoun: str, obj: str) -> Problem:
    a = rng.randint(1, MAX_NUMBER)
    b = rng.randint(1, a)
    return {
        "question": f"{name} has {a} {obj}. {pronoun} gives {b} away. How many {obj} does {name} have left?",
        "answer": f"{name} has {a} - {b} = {a - b} {obj} left.\n#### {a - b}",
    }


def _multiplication(rng: random.Random, name: str, pronoun: str, obj: str) -> Problem:
    a, b = rng.randint(1, MAX_FACTOR), rng.randint(1, MAX_FACTOR)
    return {
        "question": f"{name} has {a} bags with {b} {obj} in each bag. How many {obj} does {name} have?",
        "answer": f"{name} has {a} * {b} = {a * b} {obj}.\n#### {a * b}",
    }


def _add_then_subtract(rng: random.Random, name: str, pronoun: str, obj: str) -> Problem:
    a, b = rng.randint(1, MAX_NUMBER), rng.randint(1, MAX_NUMBER)
    c = rng.randint(1, a + b)
    total = a + b
    return {
        "question": f"{name} has {a} {obj}. {pronoun} buys {b} more, then gives {c} away. "
        f"How many {obj} are left?",
        "answer": f"{name} has {a} + {b} = {total} {obj}. Then {total} - {c} = {total - c} are left.\n"
        f"#### {total - c}",
    }


TEMPLATES: tuple[Callable[[random.Random, str, str, str], Problem], ...] = (
    _addition,
    _subtraction,
    _multiplication,
    _add_then_subtract,
)


def _iter_problems(rng: random.Random) -> Iterator[Problem]:
    while True:
        template = rng.choice(TEMPLATES)
        name, pronoun = rng.choice(NAMES)
        yield template(rng, name, pronoun, rng.choice(OBJECTS))


def generate_arithmetic_problems(n: int, seed: int) -> list[Problem]:
    """Return ``n`` problems ``{"question", "answer"}``; the answer ends with ``"#### <result>"``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return list(islice(_iter_problems(random.Random(seed)), n))


def _generate_excluding(n: int, seed: int, excluded: set[str]) -> list[Problem]:
    """Generate ``n`` problems whose questions are not in ``excluded`` (e.g. the training set)."""
    problems: list[Problem] = []
    max_draws = 100 * n + 10_000
    for problem in islice(_iter_problems(random.Random(seed)), max_draws):
        if problem["question"] not in excluded:
            problems.append(problem)
            if len(problems) == n:
                return problems
    raise ValueError(
        f"could not draw {n} problems unseen in training after {max_draws} draws; lower num_train or num_val"
    )


def _derive_seed(seed: int, stream: int) -> int:
    """Independent generator seeds for the train (0) and val (1) streams of one datamodule seed."""
    return 2 * seed + stream


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")


class ArithmeticDataModule(LossLoaders, L.LightningDataModule):
    """Synthetic arithmetic word problems for fast, offline fine-tuning runs.

    Each example is ``PROMPT_TEMPLATE`` + answer + eos, with the loss on the answer and eos
    only. Validation questions never appear in training. ``test_dataloader`` reuses val.
    """

    def __init__(
        self,
        tokenizer: str = "builtin:char",
        num_train: int = 2000,
        num_val: int = 200,
        seed: int = 0,
        batch_size: int = 16,
        max_length: int = 192,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError(f"tokenizer must be a non-empty string, got {tokenizer!r}")
        _require_positive(num_train=num_train, num_val=num_val, batch_size=batch_size, max_length=max_length)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.tokenizer_name = tokenizer
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.batch_size = batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.num_truncated = 0
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.train_problems: list[Problem] = []
        self.val_problems: list[Problem] = []
        self._train_examples: list[dict[str, Any]] = []
        self._val_examples: list[dict[str, Any]] = []

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self._train_examples:
            return
        self.train_problems = generate_arithmetic_problems(self.num_train, _derive_seed(self.seed, 0))
        train_questions = {problem["question"] for problem in self.train_problems}
        self.val_problems = _generate_excluding(self.num_val, _derive_seed(self.seed, 1), train_questions)
        self._train_examples = self._tokenize(self.train_problems)
        self._val_examples = self._tokenize(self.val_problems)
        self.num_truncated = sum(ex["truncated"] for ex in self._train_examples + self._val_examples)

    def _tokenize(self, problems: list[Problem]) -> list[dict[str, Any]]:
        return [
            tokenize_prompt_response(
                self.tokenizer, PROMPT_TEMPLATE.format(question=p["question"]), p["answer"], self.max_length
            )
            for p in problems
        ]

    def _loader(self, examples: list[dict[str, Any]], shuffle: bool) -> DataLoader:
        if not examples:
            raise RuntimeError("call setup() before requesting a dataloader")
        return self._loss_loader(examples, shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train_examples, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val_examples, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
