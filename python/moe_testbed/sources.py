"""Where a run's tokens come from: the data layer's corpus, or generated synthetic domains.

A :class:`RunData` hands the trainer micro-batches of token ids with their domain labels, the
fixed validation batches of each domain, and the per-domain token pools of the
context-perturbation probe; its ``state_dict`` is the exact data position, so a resumed run
reads the same batches. Legend: B micro-batch, S positions (S + 1 with the shifted target).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moe_testbed.config import RunConfig


class RunData:
    """What the trainer needs from a corpus.

    ``domains`` (names), ``vocab_size``; ``next_batch() -> (tokens_BS1, labels_BS1)`` int64 of
    S + 1 positions (inputs and shifted targets); ``state_dict``/``load_state_dict`` for the
    exact data position; ``val_sequences()`` the fixed validation set, ``(tokens_NS1,
    domain_N)`` with ``ceil(eval_tokens / S)`` windows per domain in domain order;
    ``pools()`` domain -> token ids, for the context-perturbation probe.
    """

    domains: list[str]
    vocab_size: int

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def val_sequences(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def pools(self) -> dict[int, torch.Tensor]:
        raise NotImplementedError


class SyntheticData(RunData):
    """Eight synthetic domains (``--data-dir synthetic``): tests and benchmarks without a corpus.

    Domain d emits a noisy first-order Markov chain over its own slice of the vocabulary plus a
    shared slice, so domains are distinguishable and next tokens are learnable. Batch n of rank
    r is drawn from a generator seeded by (seed, n * world + r): the position is one integer.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        batch: int,
        seed: int,
        rank: int,
        world: int,
        eval_windows: int,
        num_domains: int = 8,
        data_seed: int | None = None,
    ) -> None:
        self.domains = [f"synthetic{d}" for d in range(num_domains)]
        self.vocab_size, self.seq_len, self.batch = vocab_size, seq_len, batch
        self.seed, self.rank, self.world, self.eval_windows = seed, rank, world, eval_windows
        self.n = 0
        self.data_seed = seed if data_seed is None else data_seed  # domains and validation set
        g = np.random.default_rng(self.data_seed)
        width = vocab_size // (num_domains + 1)  # one slice per domain + one shared slice
        self.slices = [np.arange(d * width, (d + 1) * width) for d in range(num_domains + 1)]
        self.next_tok = [
            g.choice(np.concatenate([sl, self.slices[-1]]), size=vocab_size)
            for sl in self.slices[:-1]
        ]

    def _batch(self, key: int, batch: int, domain: int | None = None, seed: int | None = None):
        g = np.random.default_rng([self.seed if seed is None else seed, key])
        dom = (
            g.integers(len(self.domains), size=batch) if domain is None else np.full(batch, domain)
        )
        toks = np.empty((batch, self.seq_len + 1), dtype=np.int64)
        for b, d in enumerate(dom):
            pool = np.concatenate([self.slices[d], self.slices[-1]])
            t = g.choice(pool)
            noise = g.random(self.seq_len + 1) < 0.2
            rand = g.choice(pool, size=self.seq_len + 1)
            for i in range(self.seq_len + 1):
                toks[b, i] = t
                t = rand[i] if noise[i] else self.next_tok[d][t]
        labels = np.repeat(dom[:, None], self.seq_len + 1, axis=1)
        return torch.from_numpy(toks), torch.from_numpy(labels.astype(np.int64))

    def next_batch(self):
        out = self._batch(self.n * self.world + self.rank, self.batch)
        self.n += 1
        return out

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = int(state["n"])

    def val_sequences(self):
        toks = [
            self._batch(10**9 + d, self.eval_windows, d, self.data_seed)[0]
            for d in range(len(self.domains))
        ]
        dom = torch.arange(len(self.domains)).repeat_interleave(self.eval_windows)
        return torch.cat(toks), dom

    def pools(self):
        return {
            d: torch.from_numpy(np.concatenate([self.slices[d], self.slices[-1]]))
            for d in range(len(self.domains))
        }


class CorpusData(RunData):
    """The data layer's corpus: ``data_dir`` None = the sample shipped in the package."""

    def __init__(self, cfg: RunConfig, rank: int, world: int) -> None:
        from moe_testbed import data

        t, d, seq = cfg.train, cfg.data, cfg.model.seq_len
        subset = [x.strip() for x in d.domains.split(",")] if d.domains else None
        corpus = data.load_corpus(d.data_dir or "sample", subset, seed=d.data_seed)
        tok = data.train_tokenizer(corpus, vocab_size=d.tokenizer_vocab)
        self.train_set = data.build_dataset(corpus, tok, seq_len=seq, split="train")
        self.val_set = data.build_dataset(corpus, tok, seq_len=seq, split="validation")
        self.domains = list(self.train_set.domains)
        self.vocab_size = int(self.train_set.vocab_size)
        self.loader = data.BatchLoader(
            self.train_set,
            t.micro_batch_size,
            seed=t.seed,
            rank=rank,
            world_size=world,
            mixing=d.batch_domains,
        )
        seqs = data.validation_sequences(self.val_set, eval_windows(cfg), spread=True)
        self._val = (
            torch.cat([seqs[n] for n in self.domains]),
            torch.cat([torch.full((len(seqs[n]),), i) for i, n in enumerate(self.domains)]),
        )
        self._pools: dict[int, torch.Tensor] | None = None

    def next_batch(self):
        out = self.loader.batch(self.loader.step)
        self.loader.step += 1
        return out

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def val_sequences(self):
        return self._val

    def pools(self):
        if self._pools is None:  # the domain's own vocabulary: distinct ids of its train stream
            self._pools = {
                i: torch.from_numpy(
                    np.unique(np.asarray(self.train_set.tokens[n][:200_000])).astype(np.int64)
                )
                for i, n in enumerate(self.domains)
            }
        return self._pools


def eval_windows(cfg: RunConfig) -> int:
    """Validation windows per domain: ``ceil(data.eval_tokens / seq_len)`` predicted-token rows."""
    return -(-cfg.data.eval_tokens // cfg.model.seq_len)


def build_data(cfg: RunConfig, rank: int, world: int) -> RunData:
    """The run's corpus: ``synthetic``, or the data layer's corpus (``None`` = shipped sample)."""
    t, d = cfg.train, cfg.data
    if d.data_dir == "synthetic":
        vocab = cfg.model.vocab_size or 512
        return SyntheticData(
            vocab,
            cfg.model.seq_len,
            t.micro_batch_size,
            t.seed,
            rank,
            world,
            eval_windows(cfg),
            data_seed=d.data_seed,
        )
    return CorpusData(cfg, rank, world)
