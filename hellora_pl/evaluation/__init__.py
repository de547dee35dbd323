"""Evaluation on the benchmarks of the field, run from the same configs in validate and test.

math: GSM8K answers as lm-evaluation-harness extracts them (strict and flexible); code:
HumanEval/MBPP programs, pass@k, and the sandbox that runs generated code in other processes;
refusal: the HEx-PHI keyword rule and a judge hook; metrics: torchmetrics that reduce across
processes; generation: batched, left-padded generation; tasks: benchmarks as the datamodules
expose them; runner: the glue HelloraModule uses inside Lightning's loops.
"""

from hellora_pl.evaluation.code import pass_at_k
from hellora_pl.evaluation.generation import GenerationConfig
from hellora_pl.evaluation.metrics import GSM8KAccuracy, PassAtK, RefusalRate
from hellora_pl.evaluation.refusal import KeywordJudge, is_refusal
from hellora_pl.evaluation.sandbox import SandboxLimits, SandboxResult, run_program, run_programs

__all__ = [
    "GSM8KAccuracy",
    "GenerationConfig",
    "KeywordJudge",
    "PassAtK",
    "RefusalRate",
    "SandboxLimits",
    "SandboxResult",
    "is_refusal",
    "pass_at_k",
    "run_program",
    "run_programs",
]
