"""Domain-labelled text for ``analyze`` and ``specialize``: sources, splits, token windows.

Legend: D domains, N windows (sequences) of one domain, S positions; a window holds S + 1
tokens so that inputs are ``window[:, :-1]`` and next-token targets ``window[:, 1:]``.

Text sources (``--text``):

- ``sample`` (the corpus shipped in the package), ``prepared`` (the ``moe-testbed data
  prepare`` output) or any directory with a ``manifest.json`` written by ``data prepare``: a
  testbed corpus, split into train and validation by document exactly as the trainer splits it
  (``moe_testbed.data.load_corpus`` with the same ``seed``);
- a directory with one entry per domain: ``DOMAIN.txt`` / ``DOMAIN.md`` (one document),
  ``DOMAIN.jsonl[.gz]`` (``{"text": ...}`` per line) or a folder ``DOMAIN/`` of such files;
- a ``.jsonl[.gz]`` file whose lines have ``text`` and ``domain`` fields.

Every source is split by document with ``moe_testbed.data.clean.split_indices`` (10%
validation, deterministic in the seed); ``split="auto"`` takes the validation part of a testbed
corpus (the tokens the trainer evaluates) and all of the text of any other source.

Windows (:func:`domain_windows`): the documents of a domain, in order, are tokenized (no special
tokens) and joined with a separator token after every document, then cut into non-overlapping
windows of S + 1 tokens from the start, or with ``spread`` evenly spaced over the whole stream
(so over many documents): the trainer's validation windows
(``moe_testbed.data.validation_sequences(..., spread=True)``) for the same tokenizer, corpus
and data seed. Without ``spread`` only as many documents are tokenized as the windows need.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moe_testbed.data.clean import split_indices
from moe_testbed.data.prepare import MANIFEST, _dir_docs, _domain_name

SPLITS = ("auto", "train", "validation", "all")
VAL_FRACTION = 0.1  # the trainer's (moe_testbed.data.load_corpus default)
_DOMAIN_FILES = (".txt", ".md", ".jsonl", ".jsonl.gz")

Encode = Callable[[list[str]], list[list[int]]]


@dataclass
class DomainText:
    """Documents by domain: ``docs[domain]`` in source order; ``domains`` in label order."""

    domains: list[str]
    docs: dict[str, list[str]]
    source: str
    split: str


def _jsonl_records(path: Path) -> dict[str, list[str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    out: dict[str, list[str]] = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"text: {path} line {i + 1} is not valid JSON: {e}") from None
            if not isinstance(row, dict) or "text" not in row or "domain" not in row:
                raise ValueError(
                    f"text: {path} line {i + 1} needs 'text' and 'domain' fields, got "
                    f"{sorted(row) if isinstance(row, dict) else type(row).__name__}"
                )
            out.setdefault(str(row["domain"]), []).append(str(row["text"]))
    return out


def _dir_records(path: Path) -> dict[str, list[str]]:
    entries = sorted(
        p
        for p in path.iterdir()
        if not p.name.startswith((".", "_")) and (p.is_dir() or p.name.endswith(_DOMAIN_FILES))
    )
    return {_domain_name(p): [text for text, _ in _dir_docs(p)] for p in entries}


def _is_corpus(source: str) -> bool:
    return source in ("sample", "prepared") or (Path(source).expanduser() / MANIFEST).is_file()


def load_text(
    source: str | os.PathLike,
    domains: str | list[str] | None = None,
    *,
    split: str = "auto",
    seed: int = 0,
) -> DomainText:
    """The documents of every domain of ``source`` (see the module docstring).

    Args:
        source: ``sample``, ``prepared``, a corpus directory, a directory with one file or
            folder per domain, or a JSONL file with ``text`` and ``domain`` fields.
        domains: a subset (list or comma-separated names), in the order given; None = all.
        split: ``auto``, ``train``, ``validation`` or ``all``.
        seed: the document split's seed (a testbed run's ``train.seed``).
    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: unknown split or domain, fewer than two domains, a domain without text,
            a JSONL line without ``text`` and ``domain``.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    src = str(source)
    if _is_corpus(src):
        from moe_testbed.data import load_corpus

        corpus = load_corpus(src, domains, val_fraction=VAL_FRACTION, seed=seed)
        by_domain = {
            d: corpus.train[d] + corpus.validation[d]
            if split == "all"
            else (corpus.train[d] if split == "train" else corpus.validation[d])
            for d in corpus.domains
        }
        split = "validation" if split == "auto" else split
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"text: {src!r} does not exist; expected 'sample', 'prepared', a corpus "
                "directory, a directory with one file or folder per domain, or a JSONL file"
            )
        raw = _dir_records(path) if path.is_dir() else _jsonl_records(path)
        split = "all" if split == "auto" else split
        by_domain = {}
        for d, texts in raw.items():
            train, val = split_indices(texts, VAL_FRACTION, seed)
            pick = range(len(texts)) if split == "all" else (train if split == "train" else val)
            by_domain[d] = [texts[i] for i in pick]
    names = list(by_domain)
    if domains is not None:
        names = [d.strip() for d in domains.split(",")] if isinstance(domains, str) else domains
        unknown = [d for d in names if d not in by_domain]
        if unknown:
            raise ValueError(f"domains: unknown {unknown} in {src!r}; available: {list(by_domain)}")
    if len(names) < 2:
        raise ValueError(
            f"text: expected at least two domains (specialization compares domains), got "
            f"{names} from {src!r}"
        )
    for d in names:
        if not any(t.strip() for t in by_domain[d]):
            raise ValueError(f"text: domain {d!r} of {src!r} has no text in split {split!r}")
    return DomainText(list(names), {d: by_domain[d] for d in names}, src, split)


def domain_windows(
    text: DomainText,
    encode: Encode,
    sep: int,
    seq_len: int,
    max_windows: int,
    *,
    chunk_docs: int = 64,
    spread: bool = False,
) -> dict[str, torch.Tensor]:
    """The first ``max_windows`` windows of S + 1 = ``seq_len + 1`` tokens of every domain
    (``spread``: ``max_windows`` windows evenly spaced over the domain's whole stream).

    Args:
        text: the documents (:func:`load_text`).
        encode: texts -> token ids (no special tokens).
        sep: separator token id appended after every document (end of text).
        seq_len: S >= 1; max_windows: >= 1 per domain (fewer when a domain runs out of text).
    Returns:
        ``{domain: int64 (N, S + 1)}`` with 1 <= N <= ``max_windows``.
    Raises:
        ValueError: bad sizes, or a domain with fewer than S + 1 tokens.
    """
    for name, v in (("seq_len", seq_len), ("max_windows", max_windows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    S1 = seq_len + 1
    need = max_windows * S1
    out = {}
    for d in text.domains:
        stream: list[int] = []
        docs = text.docs[d]
        for i in range(0, len(docs), chunk_docs):
            for ids in encode(docs[i : i + chunk_docs]):
                stream.extend(ids)
                stream.append(sep)
            if len(stream) >= need and not spread:
                break
        total = len(stream) // S1
        n = min(max_windows, total)
        if n == 0:
            raise ValueError(
                f"text: domain {d!r} has {len(stream)} tokens, fewer than seq_len + 1 = {S1}; "
                "use a shorter --seq-len or more text"
            )
        starts = np.arange(n) * S1
        if spread and n < total:  # as moe_testbed.data.validation_sequences
            starts = np.linspace(0, total - 1, n).round().astype(np.int64) * S1
        arr = np.asarray(stream, dtype=np.int64)
        out[d] = torch.from_numpy(np.stack([arr[s : s + S1] for s in starts]))
    return out


def window_batches(
    windows: dict[str, torch.Tensor], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(tokens_BS1, labels_BS1)`` int64 batches, domain by domain in label order; a batch never
    mixes domains (the last of a domain may be short), like the trainer's validation batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    for label, seqs in enumerate(windows.values()):
        for s in range(0, seqs.shape[0], batch_size):
            x = seqs[s : s + batch_size]
            yield x, torch.full_like(x, label)


def hf_encoder(tokenizer) -> tuple[Encode, int]:
    """(encode, separator id) of a Hugging Face tokenizer: no special tokens added; the
    separator is its end-of-text token (``eos_token_id``, else ``bos_token_id``).
    Raises ValueError for a tokenizer with neither."""
    sep = tokenizer.eos_token_id
    if sep is None:
        sep = tokenizer.bos_token_id
    if sep is None:
        raise ValueError(
            "tokenizer: expected an eos_token_id or bos_token_id to separate documents, got none"
        )

    def encode(texts: list[str]) -> list[list[int]]:
        # verbose=False: documents longer than the model's context are expected here (they are
        # cut into windows), so the tokenizer's length warning would only mislead.
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    return encode, int(sep)
