"""Prompt/response tokenization with loss masking, and right-padding collation for causal LMs."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def tokenize_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int, add_eos: bool = True
) -> dict[str, Any]:
    """Tokenize ``prompt + response (+ eos)`` with the loss restricted to the response and eos.

    Prompt and response are tokenized separately so the prompt/response boundary is exact.
    Sequences longer than ``max_length`` keep their start (the eos may then be cut off).
    `add_eos=False` for chat templates, whose response text already ends the turn.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; it is needed to end each response")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + (
        [tokenizer.eos_token_id] if add_eos else []
    )
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "truncated": len(input_ids) > max_length,
    }


class CausalLMCollator:
    """Right-pad a list of tokenized examples into ``input_ids``/``attention_mask``/``labels`` tensors.

    Padding is located by each example's length, not by ``pad_token_id``, so a pad token
    equal to the eos token does not mask the eos label. Packed examples (with ``position_ids``
    restarting at each packed sequence) get ``position_ids`` and no attention mask: transformers
    then keeps attention inside each sequence, and the padding is a sequence of its own.
    """

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id must be set")
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        length = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            size = len(example["input_ids"])
            input_ids[row, :size] = torch.tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :size] = 1
            labels[row, :size] = torch.tensor(example["labels"], dtype=torch.long)
        if "position_ids" not in examples[0]:
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        position_ids = torch.arange(length).repeat(len(examples), 1)
        for row, example in enumerate(examples):
            size = len(example["position_ids"])
            position_ids[row, :size] = torch.tensor(example["position_ids"], dtype=torch.long)
            position_ids[row, size:] = torch.arange(length - size)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


class PromptCollator:
    """Left-pad prompts for batched generation; keeps each prompt's index into the evaluation set."""

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id must be set")
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(example["prompt_ids"]) for example in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            size = len(example["prompt_ids"])
            input_ids[row, length - size :] = torch.tensor(example["prompt_ids"], dtype=torch.long)
            attention_mask[row, length - size :] = 1
        return {
            "prompt_ids": input_ids,
            "prompt_attention_mask": attention_mask,
            "problem_index": [int(example["problem_index"]) for example in examples],
        }
