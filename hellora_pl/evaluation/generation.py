"""Batched generation for evaluation: left-padded prompts, greedy or sampled, stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass
class GenerationConfig:
    """How completions are generated. `num_samples` > 1 draws that many per prompt (for pass@k);
    sampling is seeded by `seed` and the batch, so a rerun reproduces the same completions.
    Generation also ends at the tokenizer's and the model's eos tokens."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    stop: list[str] | None = None  # None: the benchmark's own stop strings
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.num_samples < 1:
            raise ValueError(f"generation.num_samples must be >= 1, got {self.num_samples}.")
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError(
                "generation.num_samples > 1 needs do_sample: true (greedy decoding repeats one completion)."
            )
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"generation.temperature must be positive when sampling, got {self.temperature}.")


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """`text` up to the earliest stop string (the stop string itself removed)."""
    cut = min((index for index in (text.find(s) for s in stop or () if s) if index >= 0), default=len(text))
    return text[:cut]


def _stop_token_ids(model, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's eos and the model's own (chat models end a turn with a token of their own)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({token for token in ids if token is not None})


@torch.no_grad()
def generate_completions(
    model,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    config: GenerationConfig,
    batch_seed: int = 0,
) -> list[list[str]]:
    """`config.num_samples` completions for each left-padded prompt row, cut at stop strings."""
    sampling = {"do_sample": config.do_sample}
    if config.do_sample:
        sampling.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
    stop = {"stop_strings": list(config.stop), "tokenizer": tokenizer} if config.stop else {}
    with torch.random.fork_rng(devices=[prompt_ids.device] if prompt_ids.is_cuda else []):
        torch.manual_seed(config.seed * 1_000_003 + batch_seed)
        output = model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_attention_mask,
            max_new_tokens=config.max_new_tokens,
            num_return_sequences=config.num_samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=_stop_token_ids(model, tokenizer),
            **sampling,
            **stop,
        )
    new_tokens = output[:, prompt_ids.shape[1] :]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    texts = [truncate_at_stop(text, config.stop) for text in texts]
    n = config.num_samples
    return [texts[row * n : (row + 1) * n] for row in range(prompt_ids.shape[0])]
