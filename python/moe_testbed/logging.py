"""Metric names and where logged records go: the one module that builds or reads a name.

A metric name is ``[split/][where/]metric[@scope]``:

==========  ===============================================================================
split       ``train`` (training window), ``val`` (validation), ``probe`` (routing probes);
            absent for run-level values (``loss``, ``lr``, ``aux_loss``) and for summaries
            of one counts file (``layer0/utilization@eval``)
where       ``layer{l}`` (MoE layer l, in model order), ``all`` (mean over layers) or a
            domain name (``val/en_lit/loss``); absent for scalars of the whole model
metric      the quantity; ``kept_`` in front = the same metric of the counts kept after
            capacity (``kept_max_violation``)
scope       the token set a balance metric is computed over: a balancing scope
            (``micro_batch``, ``global_batch``), ``log_window`` (every token since the last
            log step) or ``eval`` (one evaluation pass)
==========  ===============================================================================

Examples: ``train/layer3/max_violation@global_batch``, ``val/all/specialization_score``,
``probe/layer0/stiffness``, ``val/de/ppl``, ``loss``. :func:`name` builds names, :func:`parse`
reads them back into a :class:`MetricName`, and :func:`layer_values`, :func:`series` and
:func:`val_domains` answer the questions the trainer and the reports ask.

Where records go (``metrics.jsonl``, TensorBoard) is :mod:`moe_testbed.sinks`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ALL",
    "EVAL",
    "KEPT",
    "LOG_WINDOW",
    "SPLITS",
    "MetricName",
    "is_layer_value",
    "is_loss",
    "kept",
    "layer_values",
    "name",
    "parse",
    "parse_keys",
    "series",
    "val_domains",
]

ALL = "all"
SPLITS = ("train", "val", "probe")
LOG_WINDOW = "log_window"
EVAL = "eval"
KEPT = "kept_"
_LAYER = "layer"


@dataclass(frozen=True)
class MetricName:
    """A parsed metric name; ``str(name)`` gives it back.

    ``layer`` is an int, ``ALL`` or None; ``domain`` a domain name or None (never both).
    """

    metric: str
    split: str | None = None
    layer: int | str | None = None
    domain: str | None = None
    scope: str | None = None

    def __str__(self) -> str:
        parts = [p for p in (self.split, self.where) if p is not None]
        parts.append(self.metric)
        return "/".join(parts) + (f"@{self.scope}" if self.scope else "")

    @property
    def kept(self) -> bool:
        """Whether the value is of the kept (after capacity) counts."""
        return self.metric.startswith(KEPT)

    @property
    def base(self) -> str:
        """The metric without the ``kept_`` prefix."""
        return self.metric[len(KEPT) :] if self.kept else self.metric

    @property
    def where(self) -> str | None:
        """``layer{l}``, ``all``, the domain, or None."""
        if self.layer is not None:
            return self.layer if self.layer == ALL else f"{_LAYER}{self.layer}"
        return self.domain

    @property
    def column(self) -> str:
        """The name without split and layer/domain (``max_violation@eval``): a table column."""
        return str(MetricName(self.metric, scope=self.scope))


def _check_part(value: str, what: str) -> None:
    if not isinstance(value, str) or not value or "/" in value or "@" in value:
        raise ValueError(f"{what} must be a non-empty string without '/' or '@', got {value!r}")


def name(
    metric: str,
    *,
    split: str | None = None,
    layer: int | str | None = None,
    domain: str | None = None,
    scope: str | None = None,
) -> str:
    """The metric name, e.g. ``name("max_violation", split="train", layer=3,
    scope="global_batch") == "train/layer3/max_violation@global_batch"``.

    Args: ``layer`` an int >= 0 or ``ALL``; ``domain`` a domain name (not with ``layer``);
    ``split`` one of ``SPLITS`` or None. Raises ValueError naming the bad argument.
    """
    _check_part(metric, "metric")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if layer is not None and domain is not None:
        raise ValueError(f"give layer or domain, not both (got {layer!r} and {domain!r})")
    if layer is not None and layer != ALL:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"layer must be an int >= 0 or {ALL!r}, got {layer!r}")
        layer = int(layer)
    if domain is not None:
        _check_part(domain, "domain")
    if scope is not None:
        _check_part(scope, "scope")
    return str(MetricName(metric, split, layer, domain, scope))


def kept(metric: str) -> str:
    """The name of ``metric`` computed on the kept counts (``kept_max_violation``)."""
    return KEPT + metric


def parse(key: str) -> MetricName:
    """Read a name back: ``parse("val/layer2/max_violation@eval")`` -> split ``val``, layer 2,
    metric ``max_violation``, scope ``eval``. Raises ValueError for more than three parts."""
    path, _, scope = key.partition("@")
    parts = path.split("/")
    split = parts.pop(0) if len(parts) > 1 and parts[0] in SPLITS else None
    if len(parts) == 1:
        return MetricName(parts[0], split, scope=scope or None)
    if len(parts) != 2:
        raise ValueError(f"metric name must be [split/][where/]metric[@scope], got {key!r}")
    where, metric = parts
    layer: int | str | None = None
    domain = None
    if where == ALL:
        layer = ALL
    elif where.startswith(_LAYER) and where[len(_LAYER) :].isdigit():
        layer = int(where[len(_LAYER) :])
    else:
        domain = where
    return MetricName(metric, split, layer, domain, scope or None)


def layer_values(
    metric: str, values_L: Any, *, split: str | None = None, scope: str | None = None
) -> dict[str, float]:
    """One entry per layer (``layer{l}``) and their mean (``all``) for per-layer ``values_L``
    (a sequence or array of length L, or a scalar for one layer)."""
    values = np.atleast_1d(np.asarray(values_L, dtype=np.float64))
    out = {
        name(metric, split=split, layer=layer, scope=scope): float(v)
        for layer, v in enumerate(values)
    }
    out[name(metric, split=split, layer=ALL, scope=scope)] = float(values.mean())
    return out


def parse_keys(keys: Iterable[str]) -> Iterable[tuple[str, MetricName]]:
    """(key, parsed name) of every key that is a metric name (others are skipped)."""
    for key in keys:
        try:
            yield key, parse(key)
        except ValueError:
            continue


def series(
    records: Iterable[dict[str, Any]], metric: str, *, layer: int | str | None = ALL
) -> dict[str, tuple[list[int], list[float]]]:
    """Logged values of ``metric`` at ``layer`` (default: the mean over layers), any split and
    scope: full name -> (steps, values), in record order."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for key, parsed in parse_keys(record):
            value = record[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if parsed.metric == metric and parsed.layer == layer and parsed.domain is None:
                steps, values = out.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return out


def val_domains(records: Iterable[dict[str, Any]]) -> list[str]:
    """The domains with a logged validation loss (``val/<domain>/loss``), sorted."""
    found = set()
    for record in records:
        for _, parsed in parse_keys(record):
            if parsed.split == "val" and parsed.domain is not None and parsed.metric == "loss":
                found.add(parsed.domain)
    return sorted(found)


def is_layer_value(key: str) -> bool:
    """Whether ``key`` names the value of one layer (``val/layer2/purity``), not a mean."""
    try:
        return isinstance(parse(key).layer, int)
    except ValueError:
        return False


def is_loss(key: str) -> bool:
    """``loss``, ``val/loss`` or ``val/<domain>/loss``."""
    try:
        parsed = parse(key)
    except ValueError:
        return False
    return parsed.metric == "loss" and parsed.split in (None, "val") and parsed.layer is None
