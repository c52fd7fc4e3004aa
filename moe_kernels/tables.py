"""Plain-text tables shared by the self-check, the benchmarks and the testbed's reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def format_value(v: Any, digits: int = 4) -> str:
    """A cell: floats with ``digits`` significant digits (nan/inf spelled out), others by str."""
    if isinstance(v, float):
        if math.isinf(v) or math.isnan(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table (no trailing newline); cells through ``format_value``."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)
