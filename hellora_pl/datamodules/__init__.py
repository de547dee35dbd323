"""Data: tokenizers, prompt/response collation, the synthetic arithmetic set, and the task datamodules."""

from hellora_pl.datamodules.arithmetic import ArithmeticDataModule, generate_arithmetic_problems
from hellora_pl.datamodules.code import CodeDataModule
from hellora_pl.datamodules.collate import CausalLMCollator, PromptCollator, tokenize_prompt_response
from hellora_pl.datamodules.instruction import InstructionDataModule
from hellora_pl.datamodules.math import MathDataModule
from hellora_pl.datamodules.resumable import ResumableDataLoader
from hellora_pl.datamodules.safety import SafetyDataModule
from hellora_pl.datamodules.sampler import EpochShuffleSampler
from hellora_pl.datamodules.sources import DataSource
from hellora_pl.datamodules.tokenizer import build_char_tokenizer, load_tokenizer

__all__ = [
    "ArithmeticDataModule",
    "CausalLMCollator",
    "CodeDataModule",
    "DataSource",
    "EpochShuffleSampler",
    "InstructionDataModule",
    "MathDataModule",
    "PromptCollator",
    "ResumableDataLoader",
    "SafetyDataModule",
    "build_char_tokenizer",
    "generate_arithmetic_problems",
    "load_tokenizer",
    "tokenize_prompt_response",
]
