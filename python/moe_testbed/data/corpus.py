"""Reading a prepared corpus (the built-in sample or a ``prepare`` output directory)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from moe_testbed.data.clean import split_indices
from moe_testbed.data.prepare import MANIFEST, default_corpus_dir

SAMPLE_DIR = Path(__file__).parent / "sample"


@dataclass
class Corpus:
    """Documents of several domains, split into train and validation by document.

    ``domains``: domain names, in label order (label ``i`` is ``domains[i]``);
    ``train`` / ``validation``: ``{domain: [text, ...]}``; ``manifest``: the corpus manifest;
    ``fingerprint``: a hash of the domain files' checksums and the split settings, used as a
    cache key by the tokenizer and the token datasets.
    """

    domains: list[str]
    train: dict[str, list[str]]
    validation: dict[str, list[str]]
    manifest: dict = field(repr=False)
    fingerprint: str
    path: Path

    def split(self, name: str) -> dict[str, list[str]]:
        """``{domain: [text]}`` of split ``name`` (``"train"`` or ``"validation"``/``"val"``)."""
        if name == "train":
            return self.train
        if name in ("validation", "val"):
            return self.validation
        raise ValueError(f"split: expected 'train' or 'validation', got {name!r}")


def _resolve(source: str | os.PathLike) -> Path:
    if str(source) == "sample":
        return SAMPLE_DIR
    if str(source) == "prepared":
        return default_corpus_dir()
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"source: corpus directory {str(path)!r} does not exist; expected 'sample', "
            "'prepared' or a directory written by `moe-testbed data prepare`"
        )
    return path


def read_documents(path: Path, domain: str) -> list[str]:
    """Texts of ``path/DOMAIN.jsonl.gz`` (or ``.jsonl``) in file order."""
    for name in (f"{domain}.jsonl.gz", f"{domain}.jsonl"):
        p = path / name
        if p.exists():
            opener = gzip.open if name.endswith(".gz") else open
            with opener(p, "rt", encoding="utf-8") as f:
                return [json.loads(line)["text"] for line in f if line.strip()]
    raise FileNotFoundError(f"domain {domain!r}: no {domain}.jsonl.gz in {str(path)!r}")


def select_domains(
    source: str | os.PathLike = "sample", domains: str | list[str] | None = None
) -> tuple[Path, dict, list[str]]:
    """The corpus directory, its manifest and the selected domain names, in label order, from
    the manifest alone (no document is read): what :func:`load_corpus` will load.

    Raises ``FileNotFoundError`` for a missing directory, manifest or domain file,
    ``ValueError`` for an unreadable manifest or unknown, repeated or empty domains.
    """
    path = _resolve(source)
    mpath = path / MANIFEST
    if not mpath.exists():
        raise FileNotFoundError(
            f"source: {str(path)!r} has no {MANIFEST}; expected a directory written by "
            "`moe-testbed data prepare`"
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        available = list(manifest["domains"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"source: {str(mpath)!r} is not a corpus manifest ({err!r})") from None
    if domains is None:
        names = available
    else:
        names = (
            [d.strip() for d in domains.split(",")] if isinstance(domains, str) else list(domains)
        )
        unknown = [d for d in names if d not in available]
        if unknown or not names:
            raise ValueError(
                f"domains: unknown domain(s) {unknown or names!r} in {str(path)!r}; "
                f"expected a subset of {available}"
            )
        repeated = sorted({d for d in names if names.count(d) > 1})
        if repeated:
            raise ValueError(f"domains: expected each domain once, got {repeated} repeated")
    if not names:
        raise ValueError(f"source: {str(path)!r} lists no domain; expected at least one")
    for d in names:
        if not any((path / f"{d}{ext}").exists() for ext in (".jsonl.gz", ".jsonl")):
            raise FileNotFoundError(f"domain {d!r}: no {d}.jsonl.gz in {str(path)!r}")
        if manifest["domains"][d].get("documents") == 0:
            raise ValueError(
                f"domains: domain {d!r} in {str(path)!r} is empty; expected at least one document"
            )
    return path, manifest, names


def load_corpus(
    source: str | os.PathLike = "sample",
    domains: str | list[str] | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Corpus:
    """Load a corpus and split it by document.

    ``source``: ``"sample"`` (the built-in sample shipped in the package), ``"prepared"`` (the
    default ``prepare`` output directory) or a corpus directory. ``domains``: a subset (list or
    comma-separated string), default all in the manifest, in manifest order. The split is
    deterministic in ``(documents, seed)`` (see :func:`moe_testbed.data.clean.split_indices`).
    Raises what :func:`select_domains` raises, and ``ValueError`` for a domain without
    documents.
    """
    path, manifest, names = select_domains(source, domains)
    train, val, sums = {}, {}, []
    for d in names:
        texts = read_documents(path, d)
        if not texts:
            raise ValueError(
                f"domains: domain {d!r} in {str(path)!r} is empty; expected at least one document"
            )
        tr, va = split_indices(texts, val_fraction, seed)
        train[d] = [texts[i] for i in tr]
        val[d] = [texts[i] for i in va]
        sums.append(f"{d}:{manifest['domains'][d]['sha256']}")
    key = json.dumps({"files": sums, "val_fraction": val_fraction, "seed": seed})
    return Corpus(names, train, val, manifest, hashlib.sha256(key.encode()).hexdigest()[:16], path)
