"""Corpus statistics and a distinguishability check: naive Bayes on token unigrams + bigrams.

The classifier is trained on the training split and labels every fixed validation window of
``seq_len`` tokens; per-domain accuracy tells how separable the domains are at the length the
model sees.
"""

from __future__ import annotations

import numpy as np

from moe_testbed.data.corpus import Corpus
from moe_testbed.data.dataset import TokenDataset, validation_sequences

_BIGRAM_BUCKETS = 1 << 18  # hashed bigram table; collisions cost little accuracy at this size


def _features(ids: np.ndarray, vocab: int) -> np.ndarray:
    """Feature ids of a token sequence: its unigrams, then its hashed bigrams offset by vocab."""
    ids = ids.astype(np.int64)
    bi = (ids[:-1] * 1_000_003 + ids[1:]) % _BIGRAM_BUCKETS + vocab
    return np.concatenate([ids, bi])


def naive_bayes(
    train: TokenDataset, val: TokenDataset, alpha: float = 0.1, max_per_domain: int | None = None
) -> dict:
    """Fit multinomial naive Bayes per domain on ``train`` streams and classify the validation
    windows of ``val`` (length ``val.seq_len + 1``). Returns ``{"accuracy": {domain: float},
    "overall": float, "confusion": int64 [D, D] (true x predicted), "windows": {domain: n}}``."""
    D, V = len(train.domains), train.vocab_size
    F = V + _BIGRAM_BUCKETS
    logp_DF = np.empty((D, F), dtype=np.float32)
    for i, d in enumerate(train.domains):
        counts = np.bincount(_features(np.asarray(train.tokens[d]), V), minlength=F).astype(
            np.float64
        )
        logp_DF[i] = np.log((counts + alpha) / (counts.sum() + alpha * F))
    confusion = np.zeros((D, D), dtype=np.int64)
    windows = {}
    for i, (d, seqs) in enumerate(validation_sequences(val, max_per_domain).items()):
        windows[d] = int(seqs.shape[0])
        for row in seqs.numpy():
            feats = np.bincount(_features(row[:-1], V), minlength=F)
            nz = np.flatnonzero(feats)
            score_D = logp_DF[:, nz] @ feats[nz].astype(np.float32)
            confusion[i, int(np.argmax(score_D))] += 1
    per = {
        d: float(confusion[i, i] / max(1, confusion[i].sum())) for i, d in enumerate(train.domains)
    }
    overall = float(np.trace(confusion) / max(1, confusion.sum()))
    return {"accuracy": per, "overall": overall, "confusion": confusion, "windows": windows}


def corpus_stats(corpus: Corpus, train: TokenDataset, val: TokenDataset) -> dict:
    """Per domain: documents, tokens (without separators), UTF-8 bytes and bytes per token."""
    out = {}
    for d in corpus.domains:
        docs = corpus.train[d] + corpus.validation[d]
        nbytes = sum(len(t.encode("utf-8")) for t in docs)
        ntok = train.num_tokens(d) + val.num_tokens(d) - len(docs)
        out[d] = {
            "documents": len(docs),
            "tokens": ntok,
            "bytes": nbytes,
            "bytes_per_token": nbytes / max(1, ntok),
        }
    return out


def top_confusions(confusion: np.ndarray, domains: list[str], k: int = 5) -> list:
    """The ``k`` largest off-diagonal cells as ``(true, predicted, count)``."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:k]
    pairs = [
        (domains[f // len(domains)], domains[f % len(domains)], int(off.flat[f])) for f in flat
    ]
    return [p for p in pairs if p[2] > 0]


def format_report(stats: dict, nb: dict, domains: list[str], seq_len: int) -> str:
    """A plain-text table of :func:`corpus_stats` and :func:`naive_bayes` results."""
    lines = [
        f"{'domain':<12} {'docs':>6} {'tokens':>9} {'MB':>6} {'B/tok':>6} "
        f"{'val_seqs':>8} {'NB_acc@' + str(seq_len):>11}"
    ]
    for d in domains:
        s = stats[d]
        lines.append(
            f"{d:<12} {s['documents']:>6} {s['tokens']:>9} {s['bytes'] / 1e6:>6.2f} "
            f"{s['bytes_per_token']:>6.2f} {nb['windows'][d]:>8} "
            f"{nb['accuracy'][d]:>11.3f}"
        )
    total_tok = sum(s["tokens"] for s in stats.values())
    total_b = sum(s["bytes"] for s in stats.values())
    lines.append(
        f"{'all':<12} {sum(s['documents'] for s in stats.values()):>6} {total_tok:>9} "
        f"{total_b / 1e6:>6.2f} {total_b / max(1, total_tok):>6.2f} "
        f"{sum(nb['windows'].values()):>8} {nb['overall']:>11.3f}"
    )
    pairs = top_confusions(nb["confusion"], domains)
    lines.append(
        "top confusions (true -> predicted: windows): "
        + (", ".join(f"{a} -> {b}: {n}" for a, b, n in pairs) if pairs else "none")
    )
    return "\n".join(lines)
