"""Record formats (how a row becomes an instruction and a response) and prompt templates.

A format names the fields it reads; `DataSource.fields` maps them to the data's columns. The
template turns the instruction into the prompt: the tokenizer's chat template when it has one
(`template: auto`), or a plain text template. Training and evaluation render prompts the same
way, so a model is evaluated on the prompt shape it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from hellora_pl.evaluation.code import mbpp_prompt

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)
QUESTION_TEMPLATE = "Question: {prompt}\nAnswer: "
TemplateChoice = Literal["auto", "chat", "plain"]


def _alpaca_instruction(row: Mapping[str, Any]) -> str:
    extra = row.get("input") or ""
    return f"{row['instruction']}\n\n{extra}" if extra.strip() else row["instruction"]


@dataclass(frozen=True)
class RecordFormat:
    """`required` fields must be non-empty text (lists allowed where `lists` says); `optional` may be absent."""

    name: str
    required: tuple[str, ...]
    instruction: Callable[[Mapping[str, Any]], str]
    response: Callable[[Mapping[str, Any]], str]
    optional: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()

    def problem(self, row: Mapping[str, Any]) -> str | None:
        """Why `row` cannot be used, or None when it can."""
        for name in self.required:
            value = row.get(name)
            if value is None:
                return f"missing {name!r}"
            if name in self.lists and isinstance(value, list) and value:
                continue
            if not isinstance(value, str):
                return f"{name!r} is not text"
            if not value.strip():
                return f"empty {name!r}"
        for name in self.optional:
            if row.get(name) is not None and not isinstance(row[name], str):
                return f"{name!r} is not text"
        return None


FORMATS: dict[str, RecordFormat] = {
    fmt.name: fmt
    for fmt in (
        RecordFormat("gsm8k", ("question", "answer"), itemgetter("question"), itemgetter("answer")),
        RecordFormat("metamathqa", ("query", "response"), itemgetter("query"), itemgetter("response")),
        RecordFormat("alpaca", ("instruction", "output"), _alpaca_instruction, itemgetter("output"), ("input",)),
        RecordFormat("magicoder_oss", ("problem", "solution"), itemgetter("problem"), itemgetter("solution")),
        RecordFormat("magicoder_evol", ("instruction", "response"), itemgetter("instruction"), itemgetter("response")),
        RecordFormat("mbpp", ("text", "code", "test_list"), mbpp_prompt, itemgetter("code"), lists=("test_list",)),
    )
}


def record_format(name: str, allowed: tuple[str, ...] | None = None) -> RecordFormat:
    names = allowed if allowed is not None else tuple(FORMATS)
    if name not in names:
        raise ValueError(f"Unknown data format {name!r}; choose one of {list(names)}.")
    return FORMATS[name]


@dataclass(frozen=True)
class PromptTemplate:
    """Renders an instruction into prompt text, and a response into the text that follows it.

    With a chat template the response text is what the template puts after the generation
    prompt (the response and its end-of-turn marker), found by rendering the whole exchange.
    """

    tokenizer: PreTrainedTokenizerBase
    template: TemplateChoice = "auto"
    plain: str = ALPACA_TEMPLATE
    system: str | None = None

    def __post_init__(self) -> None:
        if self.template not in ("auto", "chat", "plain"):
            raise ValueError(f"template must be 'auto', 'chat' or 'plain', got {self.template!r}.")
        if self.template == "chat" and not self.tokenizer.chat_template:
            raise ValueError("template: chat, but the tokenizer has no chat template; use template: plain or auto.")
        if "{prompt}" not in self.plain:
            raise ValueError(f"The plain template must contain '{{prompt}}', got {self.plain!r}.")

    @property
    def uses_chat(self) -> bool:
        return self.template == "chat" or (self.template == "auto" and bool(self.tokenizer.chat_template))

    def _messages(self, instruction: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": instruction}]

    def prompt(self, instruction: str) -> str:
        if not self.uses_chat:
            prefix = f"{self.system}\n\n" if self.system else ""
            return prefix + self.plain.format(prompt=instruction)
        return self.tokenizer.apply_chat_template(
            self._messages(instruction), tokenize=False, add_generation_prompt=True
        )

    def response(self, instruction: str, response: str) -> str:
        """The text after the prompt; the eos token is added by tokenization for plain prompts."""
        if not self.uses_chat:
            return response
        prompt = self.prompt(instruction)
        messages = [*self._messages(instruction), {"role": "assistant", "content": response}]
        full = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError(
                "The chat template renders the prompt differently with and without the answer, so the "
                "response tokens cannot be located; use template: plain."
            )
        return full[len(prompt) :]
