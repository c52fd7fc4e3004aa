"""Byte-level BPE tokenizer trained on a domain-balanced sample, cached by a content key."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moe_testbed.data.corpus import Corpus
from moe_testbed.data.prepare import cache_root

EOT = "<|endoftext|>"  # document separator; always id 0
TOKENIZER_VERSION = 1


def tokenizer_key(corpus: Corpus, vocab_size: int, sample_bytes: int) -> str:
    """Cache key: changes when the corpus (checksums, split) or any setting changes."""
    blob = json.dumps(
        [TOKENIZER_VERSION, corpus.fingerprint, corpus.domains, vocab_size, sample_bytes]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def balanced_sample(corpus: Corpus, sample_bytes: int) -> list[str]:
    """Up to ``sample_bytes`` of training text from every domain (same budget per domain)."""
    out = []
    for d in corpus.domains:
        total = 0
        for text in corpus.train[d]:
            if total >= sample_bytes:
                break
            out.append(text)
            total += len(text.encode("utf-8"))
    return out


def train_tokenizer(
    corpus: Corpus,
    vocab_size: int = 8192,
    *,
    sample_bytes: int = 2_000_000,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """Train (or load from cache) a byte-level BPE on a domain-balanced sample of ``corpus``.

    ``vocab_size`` includes the 256 byte tokens and the separator :data:`EOT` (id 0); it must be
    in ``[512, 65536]`` so ids fit ``uint16``. Cached as ``cache_dir/tokenizer-<key>.json``
    (default ``~/.cache/moe-testbed/tokenizers``). Encoding then decoding is the identity.
    """
    if not 512 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size: expected an int in [512, 65536], got {vocab_size}")
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"
    path = cache / f"tokenizer-{tokenizer_key(corpus, vocab_size, sample_bytes)}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(balanced_sample(corpus, sample_bytes), trainer=trainer)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


def eot_id(tok: Tokenizer) -> int:
    """Id of the document separator token."""
    i = tok.token_to_id(EOT)
    if i is None:
        raise ValueError(f"tokenizer: no {EOT!r} token; expected one made by train_tokenizer")
    return i


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens added)."""
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def decode(tok: Tokenizer, ids: list[int]) -> str:
    """Text of ``ids`` (special tokens are dropped)."""
    return tok.decode(ids, skip_special_tokens=True)
