"""GSM8K answer extraction and scoring, matching lm-evaluation-harness's ``gsm8k`` task.

Reproducing lm-eval's rules (rather than inventing our own) keeps our numbers comparable with
published GSM8K results. Read from EleutherAI/lm-evaluation-harness, lm_eval/tasks/gsm8k/gsm8k.yaml
(metadata version 3.0) and lm_eval/filters/extraction.py (``RegexFilter``):

- filter "strict-match": regex ``#### (\\-?[0-9\\.\\,]+)``, then ``take_first`` (the first match);
- filter "flexible-extract": regex ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` with ``group_select: -1`` (the
  last match; of its two groups the non-empty one is kept);
- ``RegexFilter`` strips the match and falls back to ``"[invalid]"`` when nothing matches;
- metric ``exact_match`` with ``ignore_case: true``, ``ignore_punctuation: false`` and
  ``regexes_to_ignore: [",", "\\$", "(?s).*#### ", "\\.$"]``, each removed (``re.sub`` with "")
  in that order from both the prediction and the whole reference answer, then string equality
  (lm_eval/api/metrics.py ``exact_match_hf_evaluate``).

- generation ``until: ["Question:", "</s>", "<|im_end|>"]`` (``GSM8K_STOP``) for the prompt
  "Question: {q}\nAnswer:": lm-eval's model wrappers (HFLM ``generate_until``) also cut the decoded
  continuation at the first of them after generation. ``score_math`` does the same before
  extracting, so a completion generated with other stop strings (or none) is scored as lm-eval
  would score it, and a number the model rambles into after a new "Question:" never counts.

Strict extraction also accepts MetaMath's closing line "The answer is: N" (MetaMathQA responses end
with it) when no ``#### N`` is present; like MetaMath's eval_gsm8k.py (meta-math/MetaMath), which
reads the text after the last "The answer is: ", the colon and space are required and the last
such line wins. Any other wording (e.g. "The answer is N") is left to flexible extraction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from hellora_pl.evaluation.generation import truncate_at_stop

INVALID = "[invalid]"  # lm-eval RegexFilter's fallback when nothing matches
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")  # lm-eval gsm8k.yaml generation_kwargs.until

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_METAMATH = re.compile(r"The answer is: [ \t]*\$?(\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_REGEXES_TO_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
_GOLD_MARKER = "#### "


def _pick(match: str | tuple[str, ...]) -> str:
    """The matched text, stripped; for a multi-group pattern the first non-empty group (as lm-eval)."""
    if isinstance(match, tuple):
        match = next(group for group in match if group)
    return match.strip()


def extract_strict(text: str) -> str:
    """The first ``#### N``, else the last "The answer is: N" (colon required); ``INVALID`` when neither."""
    found = _STRICT.findall(text)
    if found:
        return _pick(found[0])
    found = _METAMATH.findall(text)
    return _pick(found[-1]) if found else INVALID


def extract_flexible(text: str) -> str:
    """The last number-like span in ``text`` (lm-eval "flexible-extract"); ``INVALID`` when none."""
    found = _FLEXIBLE.findall(text)
    return _pick(found[-1]) if found else INVALID


def normalize(text: str) -> str:
    """Apply lm-eval's gsm8k ``regexes_to_ignore`` and ``ignore_case``, stripping whitespace around."""
    text = text.strip()
    for pattern in _REGEXES_TO_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower().strip()


def gold_answer(answer: str) -> str:
    """The normalized final number of a GSM8K reference answer (the text after its last ``#### ``)."""
    if _GOLD_MARKER not in answer:
        raise ValueError(f"GSM8K reference answer has no {_GOLD_MARKER!r} line: ...{answer[-120:]!r}")
    gold = normalize(answer.rsplit(_GOLD_MARKER, 1)[1])
    if not gold:
        raise ValueError(f"GSM8K reference answer has nothing after {_GOLD_MARKER!r}: ...{answer[-120:]!r}")
    return gold


def is_correct(prediction: str, gold: str) -> bool:
    """lm-eval's exact match: equal after normalizing both; ``gold`` may be a whole reference answer."""
    if prediction == INVALID:
        return False
    return normalize(prediction) == normalize(gold)


@dataclass
class MathScore:
    """Both lm-eval GSM8K verdicts for one completion, with the answers extracted (for inspection)."""

    strict: bool
    flexible: bool
    strict_answer: str
    flexible_answer: str


def score_math(completion: str, gold: str, stop: Sequence[str] = GSM8K_STOP) -> MathScore:
    """Score one completion against a gold number or a whole GSM8K reference answer.

    The completion is first cut at the earliest of `stop` (lm-eval's GSM8K stop strings by default).
    """
    completion = truncate_at_stop(completion, stop)
    strict_answer = extract_strict(completion)
    flexible_answer = extract_flexible(completion)
    return MathScore(
        strict=is_correct(strict_answer, gold),
        flexible=is_correct(flexible_answer, gold),
        strict_answer=strict_answer,
        flexible_answer=flexible_answer,
    )
