"""Token datasets (memory-mapped per domain and split) and the deterministic batch loader.

Shapes: B rows per batch, S = ``seq_len``; a row holds S+1 tokens so that inputs are
``tokens[:, :-1]`` and targets ``tokens[:, 1:]``. ``labels`` has the same shape as ``tokens``
and gives every token's domain index (``dataset.domains[i]``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from moe_testbed.data.corpus import Corpus
from moe_testbed.data.prepare import cache_root
from moe_testbed.data.tokenizer import encode_batch, eot_id


@dataclass
class TokenDataset:
    """One split of a corpus as token streams: ``tokens[domain]`` is a read-only memmap of the
    domain's documents, each followed by the separator ``eot`` (so a window that crosses a
    document boundary always contains the separator)."""

    domains: list[str]
    split: str
    seq_len: int
    tokens: dict[str, np.ndarray]
    vocab_size: int
    eot: int
    path: Path

    def num_tokens(self, domain: str | None = None) -> int:
        """Tokens of one domain, or of all domains."""
        if domain is not None:
            return int(self.tokens[domain].shape[0])
        return sum(int(a.shape[0]) for a in self.tokens.values())

    def num_windows(self, domain: str) -> int:
        """Start positions of a full (S+1)-token window in ``domain``'s stream."""
        return max(0, self.num_tokens(domain) - self.seq_len)


def _tok_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def build_dataset(
    corpus: Corpus,
    tokenizer: Tokenizer,
    seq_len: int = 256,
    split: str = "train",
    *,
    cache_dir: str | os.PathLike | None = None,
) -> TokenDataset:
    """Tokenize split ``split`` of ``corpus`` into per-domain memmaps (cached) and return it.

    Cached under ``cache_dir`` (default ``~/.cache/moe-testbed/datasets``) in a folder keyed by
    the corpus fingerprint and the tokenizer, so any change rebuilds. ``uint16`` ids when the
    vocabulary is below 65536, else ``uint32``. Raises ``ValueError`` for ``seq_len < 1``, an
    unknown split or a domain with fewer than ``seq_len + 1`` tokens.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len: expected a positive int, got {seq_len}")
    texts = corpus.split(split)
    split = "train" if split == "train" else "validation"
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "datasets"
    folder = root / f"{corpus.fingerprint}-{_tok_hash(tokenizer)}" / split
    folder.mkdir(parents=True, exist_ok=True)
    sep = eot_id(tokenizer)
    arrays = {}
    for d in corpus.domains:
        path = folder / f"{d}.npy"
        if not path.exists():
            ids = encode_batch(tokenizer, texts[d])
            flat = np.fromiter(
                (t for doc in ids for t in (*doc, sep)),
                dtype=dtype,
                count=sum(len(doc) + 1 for doc in ids),
            )
            tmp = folder / f".{d}.tmp{os.getpid()}.npy"
            np.save(tmp, flat)
            os.replace(tmp, path)
        arrays[d] = np.load(path, mmap_mode="r")
        if arrays[d].shape[0] < seq_len + 1:
            raise ValueError(
                f"seq_len: domain {d!r} ({split}) has {arrays[d].shape[0]} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data"
            )
    meta = {"domains": corpus.domains, "vocab_size": vocab, "eot": sep, "dtype": str(dtype)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return TokenDataset(list(corpus.domains), split, seq_len, arrays, vocab, sep, folder)


class BatchLoader:
    """Batches of packed (S+1)-token rows with per-token domain labels.

    ``batch(step)`` is a pure function of ``(seed, step, rank, world_size)``: the global batch of
    ``batch_size * world_size`` rows is drawn from a generator seeded with ``(seed, step)`` and
    rank ``r`` takes rows ``[r*B, (r+1)*B)``. Resuming at step s therefore needs no replay, and
    the union over ranks equals a single-rank run with the global batch size.
    ``balance="domain"`` picks each row's domain uniformly; ``"natural"`` in proportion to the
    domain's tokens; ``mixing="single"`` gives every row of a rank's batch the domain of its
    first row (single-domain micro-batches). Each row is a window at a uniformly random offset
    of one domain's stream.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        balance: str = "domain",
        mixing: str = "mixed",
    ) -> None:
        if mixing not in ("mixed", "single"):
            raise ValueError(f"mixing: expected 'mixed' or 'single', got {mixing!r}")
        self.mixing = mixing
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        if balance not in ("domain", "natural"):
            raise ValueError(f"balance: expected 'domain' or 'natural', got {balance!r}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.balance = rank, world_size, balance
        n = np.array([dataset.num_windows(d) for d in dataset.domains], dtype=np.float64)
        self.probs = np.full(len(n), 1.0 / len(n)) if balance == "domain" else n / n.sum()
        self.step = 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens_BS1, labels_BS1)``: int64 tensors of shape [B, S+1] for ``step``."""
        ds, S1 = self.dataset, self.dataset.seq_len + 1
        rng = np.random.default_rng([self.seed, step, 0x6D6F65])
        g = self.batch_size * self.world_size
        dom_G = rng.choice(len(ds.domains), size=g, p=self.probs)
        u_G = rng.random(g)
        if self.mixing == "single":  # one domain per rank's micro-batch
            dom_G = np.repeat(dom_G[:: self.batch_size], self.batch_size)
        lo = self.rank * self.batch_size
        tokens = np.empty((self.batch_size, S1), dtype=np.int64)
        for row, i in enumerate(range(lo, lo + self.batch_size)):
            d = ds.domains[dom_G[i]]
            start = int(u_G[i] * (ds.num_windows(d) + 1))
            tokens[row] = ds.tokens[d][start : start + S1]
        labels = np.repeat(dom_G[lo : lo + self.batch_size, None], S1, axis=1)
        return torch.from_numpy(tokens), torch.from_numpy(labels.astype(np.int64))

    def __iter__(self):
        while True:
            out = self.batch(self.step)
            self.step += 1
            yield out

    def state_dict(self) -> dict:
        """The next step and the settings that define the stream."""
        return {
            "step": self.step,
            "seed": self.seed,
            "world_size": self.world_size,
            "balance": self.balance,
            "batch_size": self.batch_size,
            "mixing": self.mixing,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["step"]``; raises ``ValueError`` if the stream settings differ."""
        for k in ("seed", "world_size", "balance", "batch_size", "mixing"):
            if state.get(k, "mixed") != getattr(self, k):
                raise ValueError(
                    f"{k}: checkpoint has {state[k]!r}, loader has {getattr(self, k)!r}"
                )
        self.step = int(state["step"])


def validation_sequences(
    dataset: TokenDataset, max_per_domain: int | None = None, *, spread: bool = False
) -> dict[str, torch.Tensor]:
    """Fixed non-overlapping (S+1)-token windows of every domain: ``{domain: int64 [N, S+1]}``,
    the first ``max_per_domain`` windows of each stream (all when ``None``), or with ``spread``
    ``max_per_domain`` windows evenly spaced over the whole stream (so over many documents)."""
    S1 = dataset.seq_len + 1
    out = {}
    for d in dataset.domains:
        total = dataset.num_tokens(d) // S1
        n = total if max_per_domain is None else min(total, max_per_domain)
        if spread and n < total:
            starts = np.linspace(0, total - 1, n).round().astype(np.int64) * S1
        else:
            starts = np.arange(n, dtype=np.int64) * S1
        stream = np.asarray(dataset.tokens[d])
        arr = np.stack([stream[s : s + S1] for s in starts]).astype(np.int64).reshape(n, S1)
        out[d] = torch.from_numpy(arr)
    return out


def validation_batches(dataset: TokenDataset, batch_size: int, max_per_domain: int | None = None):
    """Yield ``(tokens_BS1, labels_BS1)`` int64 batches over :func:`validation_sequences`, domain
    by domain in label order (a batch never mixes domains; the last of a domain may be short)."""
    for i, seqs in enumerate(validation_sequences(dataset, max_per_domain).values()):
        for s in range(0, seqs.shape[0], batch_size):
            x = seqs[s : s + batch_size]
            yield x, torch.full_like(x, i)
