"""Tokenizer loading, including a built-in character-level tokenizer that needs no download."""

from __future__ import annotations

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from hellora_pl.backbones.shipped import resolve_shipped

CHAR_TOKENIZER_NAME = "builtin:char"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
CHAR_ALPHABET = tuple(chr(code) for code in range(ord(" "), ord("~") + 1)) + ("\n",)


def load_tokenizer(name_or_path: str) -> transformers.PreTrainedTokenizerBase:
    """Load a tokenizer by hub id, local directory, a shipped model's name (``hellora:mini-olmoe``), or ``"builtin:char"``.

    Many causal LMs ship without a pad token; in that case ``pad_token`` is set to
    ``eos_token``. This is safe here because padding is identified by sequence length
    (attention_mask / labels of -100), never by comparing ids with ``pad_token_id``.
    """
    if name_or_path == CHAR_TOKENIZER_NAME:
        return build_char_tokenizer()
    name_or_path = resolve_shipped(name_or_path)  # hellora:mini-olmoe -> its folder
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Could not load tokenizer {name_or_path!r}: {err}. Pass a Hugging Face hub id, "
            f"a local directory holding a tokenizer, or {CHAR_TOKENIZER_NAME!r}."
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Build a deterministic character-level tokenizer (100 tokens) over printable ASCII and newline.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then the alphabet. No special
    tokens are added on encode, and special-token strings occurring in text are split into
    characters, so ``decode(encode(s), skip_special_tokens=True) == s`` for any such text.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHAR_ALPHABET)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # [\s\S] (not ".") so that newlines become tokens too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse concatenates tokens; the default decoder would join them with spaces.
    backend.decoder = decoders.Fuse()
    pad, bos, eos, unk = SPECIAL_TOKENS
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )
