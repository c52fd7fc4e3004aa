"""Text cleaning: licence headers, untranslated paragraphs, duplicates, near-empty documents,
document chunking and the deterministic train/validation split.

All functions are pure (strings in, strings out) so that they can be tested on their own.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator

_LICENCE_WORDS = re.compile(
    r"copyright|licen[cs]e|permission is hereby|warranty|spdx-license|all rights reserved"
    r"|redistribution and use|free software foundation",
    re.IGNORECASE,
)


def _leading_comment(lines: list[str], i: int, syntax: str) -> int:
    """Return the index just past the comment block starting at line ``i`` (``i`` if none)."""
    line = lines[i].lstrip()
    if syntax == "py" or line.startswith("#"):
        j = i
        while j < len(lines) and lines[j].lstrip().startswith("#"):
            j += 1
        return j
    if line.startswith("//"):
        j = i
        while j < len(lines) and lines[j].lstrip().startswith("//"):
            j += 1
        return j
    if line.startswith("/*"):
        j = i
        while j < len(lines):
            if "*/" in lines[j]:
                return j + 1
            j += 1
        return j
    return i


def strip_licence_header(text: str, syntax: str = "c") -> str:
    """Remove leading comment blocks that carry licence/copyright text.

    ``syntax`` is ``"py"`` (``#`` comments) or ``"c"`` (``/* */`` and ``//``, also Go, Rust, Java,
    JavaScript). Comment blocks without licence words (e.g. a module description) are kept, as is
    all code. Leading blank lines and a ``#!`` line go with the header.
    """
    if syntax not in ("py", "c"):
        raise ValueError(f"syntax: expected 'py' or 'c', got {syntax!r}")
    lines = text.split("\n")
    i = 0
    while True:
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith("#!")):
            i += 1
        if i >= len(lines):
            return ""
        end = _leading_comment(lines, i, syntax)
        if end == i or not _LICENCE_WORDS.search("\n".join(lines[i:end])):
            break
        i = end
    return "\n".join(lines[i:])


_STOP = {
    "en": "the and of to is in that for with this you are be it on or by can from as not".split(),
    "de": "der die das und ist nicht ein eine mit sie den zu von auf für im des wird sich".split(),
    "fr": "le la les et est des une un pour dans que pas sur avec vous ce au du par qui".split(),
    "es": "el la los las y es en que de una un para por con se del al no como su".split(),
}
_SCRIPT = {
    "ru": re.compile(r"[\u0400-\u04ff]"),
    "zh": re.compile(r"[\u4e00-\u9fff]"),
    "ja": re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]"),
}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def is_untranslated(paragraph: str, language: str) -> bool:
    """True when ``paragraph`` carries no sign of ``language`` (English, numbers, API names).

    A cheap heuristic. For ru, zh and ja a paragraph without a single character of the target
    script goes: such text (English, number tables, API names) is shared verbatim by every
    translation. Otherwise English stop words are counted against the target language's stop
    words (Latin scripts) or its words in the target script; a paragraph needs at least two
    English stop words to go, so short labels and identifiers are kept.
    """
    if language not in _STOP and language not in _SCRIPT:
        raise ValueError(
            f"language: expected one of {sorted([*_STOP, *_SCRIPT])}, got {language!r}"
        )
    if language in _SCRIPT and not _SCRIPT[language].search(paragraph):
        return True
    words = [w.lower() for w in _WORD.findall(paragraph)]
    english = sum(w in _EN for w in words)
    if english < 2:
        return False
    if language in ("zh", "ja"):
        target = len(_SCRIPT[language].findall(paragraph)) // 2  # about two characters a word
    elif language in _SCRIPT:
        target = sum(1 for w in words if _SCRIPT[language].search(w))
    else:
        stop = set(_STOP[language])
        target = sum(w in stop for w in words)
    return english > target


_EN = set(_STOP["en"])


def drop_untranslated(text: str, language: str) -> str:
    """Drop paragraphs (blank-line separated) of ``text`` that are English, see
    :func:`is_untranslated`."""
    paras = re.split(r"\n\s*\n", text)
    return "\n\n".join(p for p in paras if not is_untranslated(p, language))


def normalise(text: str) -> str:
    """Unify newlines, strip trailing spaces, collapse runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def chunk(text: str, max_chars: int = 6000) -> list[str]:
    """Split ``text`` into pieces of at most about ``max_chars`` characters at paragraph (blank
    line) boundaries, falling back to line boundaries inside very long paragraphs."""
    if len(text) <= max_chars:
        return [text]
    pieces: list[tuple[str, str]] = []  # (separator before the piece, piece)
    for para in text.split("\n\n"):
        if len(para) <= max_chars:
            pieces.append(("\n\n", para))
        else:
            pieces.extend(("\n\n" if j == 0 else "\n", ln) for j, ln in enumerate(para.split("\n")))
    out, cur = [], ""
    for sep, piece in pieces:
        if cur and len(cur) + len(sep) + len(piece) > max_chars:
            out.append(cur)
            cur = piece
        else:
            cur = cur + sep + piece if cur else piece
    if cur:
        out.append(cur)
    return [c.strip("\n") for c in out if c.strip()]


def is_near_empty(text: str, min_chars: int = 64) -> bool:
    """True when ``text`` has fewer than ``min_chars`` non-space characters."""
    return len(text) - text.count(" ") - text.count("\n") - text.count("\t") < min_chars


def doc_hash(text: str) -> str:
    """sha1 of the whitespace-normalised text (the deduplication key)."""
    return hashlib.sha1(" ".join(text.split()).encode("utf-8")).hexdigest()


def dedup(
    docs: Iterable[tuple[str, str]], seen: set[str] | None = None
) -> Iterator[tuple[str, str]]:
    """Yield ``(text, src)`` pairs whose normalised text was not seen before."""
    seen = set() if seen is None else seen
    for text, src in docs:
        h = doc_hash(text)
        if h not in seen:
            seen.add(h)
            yield text, src


def clean_document(
    text: str, *, language: str | None = None, code: str | None = None, min_chars: int = 64
) -> str | None:
    """Apply the per-domain rules to one document; ``None`` when nothing worth keeping is left."""
    text = normalise(text)
    if code is not None:
        text = strip_licence_header(text, code)
    if language is not None:
        text = drop_untranslated(text, language)
    text = text.strip("\n")
    return None if is_near_empty(text, min_chars) else text


def split_indices(texts: list[str], val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Split documents into (train, validation) index lists, deterministically from ``seed``.

    Documents are ordered by ``sha1(seed, text)`` and the first ``ceil(val_fraction * n)`` go to
    validation (at least one when there are two or more documents), so the split depends only on
    the documents and the seed, never on their order. Both lists come back in input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in [0, 1), got {val_fraction}")
    n = len(texts)
    n_val = math.ceil(val_fraction * n) if n >= 2 else 0
    if val_fraction > 0 and n >= 2:
        n_val = max(1, min(n_val, n - 1))
    key = [hashlib.sha1(f"{seed}\0{t}".encode()).digest() for t in texts]
    order = sorted(range(n), key=lambda i: key[i])
    val = set(order[:n_val])
    return [i for i in range(n) if i not in val], sorted(val)
