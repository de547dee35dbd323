"""The miniature MoE's pretraining text: three domains of real, offline, permissively licensed text.

- math: GSM8K train questions with their worked solutions (MIT), calculator annotations removed;
- code: the Python standard library's own ``.py`` files (PSF licence), tests and demos left out;
- prose: the Python documentation's reST sources (PSF licence), as Debian's ``python3.11-doc``
  ships them, with literal blocks, doctests and directive lines removed.

The instruction and refusal data in ``../shared/data/safety`` is CC-BY-NC-4.0, so weights trained
on it could not be shipped under this project's licence; it is left out of pretraining and used only
by the fine-tuning study. Every document goes to train or validation by a stable hash of its name,
so the split does not depend on the order files are listed in.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

DOMAINS = ("math", "code", "prose")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
VAL_PERCENT = 5  # documents whose name hashes below this percentage are held out
CODE_EXCLUDED_PARTS = {"test", "tests", "idlelib", "turtledemo", "site-packages", "lib2to3", "pydoc_data", "__pycache__"}
CODE_MAX_BYTES = 200_000  # a few generated tables (unicode data, encodings) would otherwise dominate
PYTHON_DOCS_HINT = (
    "apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb pydoc "
    "(then pass --python-docs pydoc/usr/share/doc/python3.11/html/_sources)"
)


@dataclass(frozen=True)
class Document:
    domain: str
    name: str  # stable across machines: the split hashes it
    text: str


def is_validation(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


# -- the three domains ----------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^>]*>>")


def math_documents(gsm8k_dir: Path) -> list[Document]:
    """One document per GSM8K train problem: ``Question: ...\\nAnswer: <worked solution>``."""
    path = Path(gsm8k_dir) / "train.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"math domain: {path} not found; pass --gsm8k a folder holding GSM8K's train.jsonl")
    docs = []
    for number, line in enumerate(path.read_text().splitlines()):
        row = json.loads(line)
        answer = _CALCULATOR.sub("", row["answer"])
        docs.append(Document("math", f"gsm8k/train/{number}", f"Question: {row['question']}\nAnswer: {answer}"))
    return docs


def code_documents(stdlib_dir: Path) -> list[Document]:
    """The standard library's modules, one document per file, in sorted order."""
    root = Path(stdlib_dir)
    if not (root / "os.py").is_file():
        raise FileNotFoundError(f"code domain: {root} holds no os.py; pass --stdlib the standard library's folder")
    docs = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if CODE_EXCLUDED_PARTS & set(relative.parts[:-1]) or path.stat().st_size > CODE_MAX_BYTES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document("code", f"stdlib/{relative.as_posix()}", text))
    return docs


_DIRECTIVE = re.compile(r"^\s*\.\.\s")  # a directive or a comment
_DIRECTIVE_NAME = re.compile(r"^\s*\.\.\s+([\w:-]+)::")
CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "testcode", "testoutput", "testsetup", "testcleanup", "doctest", "productionlist", "highlight", "literalinclude", "raw", "csv-table", "parsed-literal"}
_ROLE = re.compile(r":[A-Za-z:+-]+:`[!~]?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`~os.path <x>` -> os.path
_HEADING_RULE = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{3,}\s*$")


def clean_rest(text: str) -> str:
    """reST to running prose: literal blocks (after a paragraph ending ``::``), the bodies of code
    directives, doctest lines, directive and comment lines and heading underlines are dropped; the
    bodies of other directives (notes, function descriptions) and paragraphs are kept, dedented."""
    out: list[str] = []
    skip_indent: int | None = None  # inside a code block: lines indented deeper than this are dropped
    pending: int | None = None  # the indent of a line that opens a code block on its next indented line
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if pending is not None and stripped:
            opened, pending = pending, None
            if indent > opened:
                skip_indent = opened
                continue
        directive = _DIRECTIVE_NAME.match(line)
        if directive:
            if directive.group(1) in CODE_DIRECTIVES:
                pending = indent
            continue
        if _DIRECTIVE.match(line) or _HEADING_RULE.match(stripped) or stripped.startswith((">>>", "...")):
            continue
        if stripped.endswith("::"):
            pending = indent
            stripped = stripped[:-1].rstrip(":")
            if stripped:
                out.append(stripped + ":")
            continue
        out.append(stripped)
    prose = _ROLE.sub(r"\1", "\n".join(out)).replace("``", "")
    return re.sub(r"\n{3,}", "\n\n", prose).strip()


def prose_documents(docs_dir: Path) -> list[Document]:
    """The Python documentation's reST sources (``*.rst.txt``), cleaned to prose, one per file."""
    root = Path(docs_dir)
    paths = sorted(root.rglob("*.rst.txt")) if root.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"prose domain: no *.rst.txt under {root}; get them with: {PYTHON_DOCS_HINT}")
    docs = []
    for path in paths:
        text = clean_rest(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            docs.append(Document("prose", f"pydoc/{path.relative_to(root).as_posix()}", text))
    return docs


def load_documents(gsm8k: Path, stdlib: Path, python_docs: Path) -> dict[str, list[Document]]:
    """Every domain's documents; each source is checked before any is read."""
    for label, path in (("--gsm8k", gsm8k), ("--stdlib", stdlib), ("--python-docs", python_docs)):
        if not Path(path).is_dir():
            hint = PYTHON_DOCS_HINT if label == "--python-docs" else "a folder"
            raise FileNotFoundError(f"{label} {path} is not a folder; give {hint}")
    return {"math": math_documents(gsm8k), "code": code_documents(stdlib), "prose": prose_documents(python_docs)}


def split(docs: Iterable[Document]) -> tuple[list[Document], list[Document]]:
    train, val = [], []
    for doc in docs:
        (val if is_validation(doc.name) else train).append(doc)
    return train, val


# -- tokenizer and token streams -----------------------------------------------------------------


def train_tokenizer(train_docs: dict[str, list[Document]], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the training documents of every domain; digits stay single tokens so
    arithmetic is spelled the same way whatever the number."""
    backend = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_interleave(train_docs), trainer=trainer)
    pad, bos, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        model_max_length=1_000_000,  # documents are tokenized whole, then cut into windows
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _interleave(docs: dict[str, list[Document]]) -> Iterator[str]:
    for domain in DOMAINS:
        for doc in docs[domain]:
            yield doc.text


def token_stream(tokenizer: PreTrainedTokenizerFast, docs: list[Document]) -> np.ndarray:
    """The documents' tokens, each followed by eos, concatenated (int32)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    batch = 256
    for start in range(0, len(docs), batch):
        for row in tokenizer([d.text for d in docs[start : start + batch]], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def validation_windows(stream: np.ndarray, length: int, count: int) -> np.ndarray:
    """``count`` consecutive, non-overlapping windows of ``length`` tokens from the start of a stream."""
    if len(stream) < length * count:
        raise ValueError(f"validation stream has {len(stream)} tokens; {count} windows of {length} need {length * count}")
    return stream[: length * count].reshape(count, length)
