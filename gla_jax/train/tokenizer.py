"""Tokenizers: a built-in byte-level one and a wrapper over an HF ``tokenizers`` ``tokenizer.json`` (optional import).

Both expose ``encode(text) -> np.ndarray[int32]``, ``decode(ids) -> str``, ``vocab_size`` and ``eos_id``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gla_jax.errors import UserError


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; ``eos_id`` = 256; ``vocab_size`` = 257 (models pad their vocab above it)."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizers`` JSON file (e.g. LLaMA-2's or one trained with ``train_bpe``). EOS: the first of ``</s>``,
    ``<|endoftext|>``, ``<eos>``, ``[SEP]`` present in the vocabulary (or ``eos_token`` if given)."""

    name = "hf"

    def __init__(self, path: str | Path, eos_token: str | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - optional dependency
            raise UserError("data.tokenizer: a tokenizer.json needs the 'tokenizers' package "
                             "(pip install tokenizers)") from e
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"data.tokenizer: no such tokenizer file {str(path)!r}")
        self.path = str(path)
        self._tok = Tokenizer.from_file(str(path))
        candidates = [eos_token] if eos_token else ["</s>", "<|endoftext|>", "<eos>", "[SEP]", "<|end_of_text|>"]
        eos = None
        for c in candidates:
            i = self._tok.token_to_id(c) if c else None
            if i is not None:
                eos = i
                break
        if eos is None:
            raise UserError(f"data.tokenizer: {path} has no end-of-sequence token (tried {candidates})")
        self.eos_id = int(eos)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


def get_tokenizer(spec: str):
    """``"byte"`` -> ByteTokenizer; a path to ``tokenizer.json`` (or a folder holding one) -> HFTokenizer."""
    if not isinstance(spec, str) or not spec:
        raise UserError(f"data.tokenizer: expected 'byte' or a path to tokenizer.json, got {spec!r}")
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def train_bpe(texts, vocab_size: int, path: str | Path, *, min_frequency: int = 2) -> HFTokenizer:
    """Trains a byte-level BPE on an iterable of strings and writes ``tokenizer.json`` to ``path``.

    The special token ``<|endoftext|>`` (id 0) is the EOS. Needs the ``tokenizers`` package.
    """
    if vocab_size < 300:
        raise UserError(f"vocab_size: must be >= 300 for a byte-level BPE, got {vocab_size}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return HFTokenizer(path)
