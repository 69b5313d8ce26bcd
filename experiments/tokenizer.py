"""A GGUF file's byte-level BPE tokenizer rebuilt with Hugging Face ``tokenizers``.

GGUF stores the tokenizer as metadata: ``tokenizer.ggml.model`` (``"gpt2"`` for byte-level
BPE), ``tokenizer.ggml.pre`` (llama.cpp's name for the pre-tokenizer), ``tokenizer.ggml.tokens``
(the vocabulary, id order, in GPT-2's byte-to-unicode alphabet: a space is ``Ġ``),
``tokenizer.ggml.merges`` (``"a b"`` strings, rank order), ``tokenizer.ggml.token_type``
(1 normal, 3 control, 4 user-defined) and the bos/eos/unknown ids.

Pre-tokenizers (llama.cpp's names):

- ``"gpt-2"``: GPT-2's regex, ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+|
  ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``;
- ``"smollm"``: every digit split off first (``"2024"`` is four tokens, and ``" 2024"`` is
  ``" "`` then four digits), then GPT-2's regex; Hugging Face's SmolLM2 tokenizer is the same
  (``Digits(individual_digits=True)`` then ``ByteLevel``).

Control tokens (``<|im_start|>``, ...) become special tokens: matched whole in the input and
skipped by ``decode`` unless ``skip_special_tokens=False``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

SPLIT_DIGITS = {"gpt-2": False, "gpt2": False, "smollm": True}
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 1, 3, 4


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in SPLIT_DIGITS:
        raise NotImplementedError(
            f"tokenizer.ggml.pre {pre!r} is not supported (known: {sorted(SPLIT_DIGITS)})"
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if not SPLIT_DIGITS[pre]:
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def _merges(merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for rank, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"tokenizer.ggml.merges[{rank}] = {merge!r} is not 'a b'")
        pairs.append((parts[0], parts[1]))
    return pairs


def _post_processor(metadata: Mapping[str, Any], tokens: list[str]) -> Any:
    """bos/eos added to every encoding when ``tokenizer.ggml.add_bos_token`` /
    ``add_eos_token`` say so (SmolLM2: neither), else None."""
    ends = {}
    for end in ("bos", "eos"):
        if metadata.get(f"tokenizer.ggml.add_{end}_token", False):
            token_id = int(metadata[f"tokenizer.ggml.{end}_token_id"])
            ends[end] = (tokens[token_id], token_id)
    if not ends:
        return None
    bos = [ends["bos"][0]] if "bos" in ends else []
    eos = [ends["eos"][0]] if "eos" in ends else []
    single = " ".join([*bos, "$A", *eos])
    pair = " ".join([*bos, "$A", *eos, "$B", *eos])
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=list(ends.values())
    )


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """The tokenizer that a GGUF file's metadata describes (see the module docstring).

    Args:
      metadata: GGUF key/value fields as Python values
        (:func:`experiments.gguf_llama.read_metadata`).
    Returns:
      a ``tokenizers.Tokenizer``: ``encode(text).ids`` are the model's token ids and
      ``decode(ids)`` gives the text back.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(f"tokenizer.ggml.model {kind!r}: only 'gpt2' (byte-level BPE)")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("tokenizer.ggml.tokens has repeated tokens")
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(
        vocab=vocab,
        merges=_merges(list(metadata.get("tokenizer.ggml.merges", []))),
        unk_token=tokens[int(unk_id)] if unk_id is not None else None,
    )
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "gpt-2")))
    tokenizer.decoder = decoders.ByteLevel()
    types = list(metadata.get("tokenizer.ggml.token_type", [TOKEN_TYPE_NORMAL] * len(tokens)))
    control = [t for t, k in zip(tokens, types) if k == TOKEN_TYPE_CONTROL]
    user = [t for t, k in zip(tokens, types) if k == TOKEN_TYPE_USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t in user])
    post = _post_processor(metadata, tokens)
    if post is not None:
        tokenizer.post_processor = post
    if tokenizer.get_vocab_size() != len(tokens):
        raise ValueError(
            f"rebuilt tokenizer has {tokenizer.get_vocab_size()} tokens, the file {len(tokens)}"
        )
    return tokenizer


__all__ = ["SPLIT_DIGITS", "tokenizer_from_gguf"]
