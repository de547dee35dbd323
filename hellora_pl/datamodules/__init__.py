"""Data: tokenizers, prompt/response collation, and the synthetic arithmetic datamodule."""

from hellora_pl.datamodules.arithmetic import ArithmeticDataModule, generate_arithmetic_problems
from hellora_pl.datamodules.collate import CausalLMCollator, tokenize_prompt_response
from hellora_pl.datamodules.sampler import EpochShuffleSampler
from hellora_pl.datamodules.tokenizer import build_char_tokenizer, load_tokenizer

__all__ = [
    "ArithmeticDataModule",
    "CausalLMCollator",
    "EpochShuffleSampler",
    "build_char_tokenizer",
    "generate_arithmetic_problems",
    "load_tokenizer",
    "tokenize_prompt_response",
]
