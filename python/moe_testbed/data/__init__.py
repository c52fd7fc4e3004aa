"""The testbed's multi-domain data: corpus, cleaning, tokenizer, token datasets, loader.

Quick start (the built-in sample needs no preparation and no network)::

    from moe_testbed.data import load_corpus, train_tokenizer, build_dataset, BatchLoader
    corpus = load_corpus("sample")                       # Corpus: .domains, .train, .validation
    tok = train_tokenizer(corpus, vocab_size=4096)       # byte-level BPE, cached by content key
    train = build_dataset(corpus, tok, seq_len=256, split="train")   # per-domain uint16 memmaps
    loader = BatchLoader(train, batch_size=16, seed=0, rank=0, world_size=1, balance="domain")
    tokens_BS1, labels_BS1 = loader.batch(step)          # int64 [B, S+1] each
    val = build_dataset(corpus, tok, seq_len=256, split="validation")
    for tokens_BS1, labels_BS1 in validation_batches(val, batch_size=32): ...

API
---
``prepare_corpus(domains=None, mb=8.0, out=None, *, permissive_only=False, seed=0,
max_doc_chars=6000, cache=None, compresslevel=6, force=False, quiet=False) -> dict``
    Build the registry corpus (19 domains, :data:`DOMAINS`) into ``out`` (default
    ``$XDG_CACHE_HOME/moe-testbed/corpus``): ``DOMAIN.jsonl.gz`` (``{"text", "src"}`` per line)
    and ``manifest.json`` (documents, bytes, sources, licences, sha256 per domain; unavailable
    domains with the reason). Incremental; per-domain files are written atomically.
``prepare_from_dir(src, out, *, mb=None)`` / ``prepare_from_hf(name, out, ...)``
    The same output from a local directory or a Hugging Face dataset (optional ``datasets``).
``load_corpus(source="sample", domains=None, *, val_fraction=0.1, seed=0) -> Corpus``
    ``source`` is ``"sample"``, ``"prepared"`` or a corpus directory. The train/validation split
    is by document and deterministic in the seed. ``Corpus.domains[i]`` is label ``i``.
``train_tokenizer(corpus, vocab_size=8192, *, sample_bytes=2_000_000, cache_dir=None)``
    -> ``tokenizers.Tokenizer``; separator ``EOT = "<|endoftext|>"`` has id 0.
``build_dataset(corpus, tokenizer, seq_len=256, split="train", *, cache_dir=None)``
    -> :class:`TokenDataset` with ``tokens[domain]`` a memmap of documents each followed by the
    separator; cached under ``~/.cache/moe-testbed/datasets/<corpus>-<tokenizer>/``.
``BatchLoader(dataset, batch_size, *, seed=0, rank=0, world_size=1, balance="domain")``
    ``batch(step) -> (tokens_BS1, labels_BS1)``, a pure function of (seed, step, rank,
    world_size); iterable; ``state_dict()`` / ``load_state_dict()`` resume without replay.
    ``balance="natural"`` samples domains in proportion to their tokens.
``validation_sequences(dataset, max_per_domain=None) -> {domain: int64 [N, S+1]}`` and
``validation_batches(dataset, batch_size, max_per_domain=None)`` yield fixed windows.

Rows never span two domains, and a row that crosses a document boundary contains the
separator. Labels are int64 domain indices aligned with every token.
Command line: ``moe-testbed data prepare|inspect`` (:mod:`moe_testbed.data.cli`).
"""

from moe_testbed.data.corpus import SAMPLE_DIR, Corpus, load_corpus
from moe_testbed.data.dataset import (
    BatchLoader,
    TokenDataset,
    build_dataset,
    validation_batches,
    validation_sequences,
)
from moe_testbed.data.prepare import prepare_corpus, prepare_from_dir, prepare_from_hf
from moe_testbed.data.sources import DOMAINS, SAMPLE_DOMAINS
from moe_testbed.data.tokenizer import EOT, train_tokenizer

__all__ = [
    "DOMAINS",
    "EOT",
    "SAMPLE_DIR",
    "SAMPLE_DOMAINS",
    "BatchLoader",
    "Corpus",
    "TokenDataset",
    "build_dataset",
    "load_corpus",
    "prepare_corpus",
    "prepare_from_dir",
    "prepare_from_hf",
    "train_tokenizer",
    "validation_batches",
    "validation_sequences",
]
