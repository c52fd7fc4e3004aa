"""Sweep grids: YAML files listing runs as sets of ``moe-testbed train`` flags.

A grid file holds a ``base`` flag set shared by every run and a ``runs`` list, each entry a
flag set applied on top of the base (a mapping of flag name -> value)::

    description: learned router, Switch aux loss at three balancing scopes
    base: {preset: tiny, steps: 200, micro-batch-size: 4, domains: "en_lit,de,zh,code_py"}
    runs:
      - {balance: aux, scope: sequence}
      - {balance: aux, scope: global_batch, name: aux-global}   # optional explicit name

Flag names are those of ``moe-testbed train --help`` without the leading dashes (``_`` and
``-`` both accepted); booleans are ``true``/``false`` (``--probes`` / ``--no-probes``) and
``null`` is ``none``. ``out`` and ``seed`` are the sweep's (``--out``, ``--seeds``).
The shipped grids (``scope``, ``methods``, ``capacity``, ``design``) live next to this module
in ``grids/``; a GRID argument is one of their names or the path of a YAML file.

Every run is checked before anything trains: unknown flags, bad values and inconsistent
configs are a ``GridError`` naming the file, the run index and the flag.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GRID_DIR = Path(__file__).parent / "grids"
SHIPPED = ("scope", "methods", "capacity", "design")
RESERVED = {"out": "the sweep sets each run's --out (sweep --out)", "seed": "use sweep --seeds"}


class GridError(ValueError):
    """A grid file that cannot be read or holds an invalid run."""


@dataclass
class Run:
    """One run of a grid (before seeds): its name and the train flags of base + its own."""

    name: str
    flags: dict[str, Any]  # dashed flag name -> value, base first then the run's own
    own: dict[str, Any] = field(default_factory=dict)  # the settings that differ from base
    steps: int = 0  # the run's optimizer steps (resolved config)


@dataclass
class Grid:
    name: str
    path: Path
    description: str
    base: dict[str, Any]
    runs: list[Run]


def shipped_grids() -> dict[str, Path]:
    """Name -> path of every grid file shipped with the package."""
    return {p.stem: p for p in sorted(GRID_DIR.glob("*.yaml"))}


def grid_path(spec: str | Path) -> Path:
    """The file of a grid given by shipped name or path. Raises GridError listing the names."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise GridError(f"GRID: grid file {str(path)!r} not found")
        return path
    shipped = shipped_grids()
    if str(spec) not in shipped:
        raise GridError(
            f"GRID: expected a shipped grid ({', '.join(shipped)}) or a .yaml file, got {spec!r}"
        )
    return shipped[str(spec)]


class _Raising(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise GridError(message)


def train_parser() -> argparse.ArgumentParser:
    """A parser holding exactly ``moe-testbed train``'s config flags."""
    from moe_testbed.flags import add_config_flags

    p = _Raising(prog="train", add_help=False, exit_on_error=False)
    add_config_flags(p)
    return p


def known_flags(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.Action]:
    """Flag name (no dashes) -> its action, for every config flag of ``moe-testbed train``."""
    parser = parser or train_parser()
    return {
        opt[2:]: a
        for a in parser._actions
        for opt in a.option_strings
        if opt.startswith("--") and not opt.startswith("--no-")
    }


def normalise_key(key: Any) -> str:
    return str(key).strip().lstrip("-").replace("_", "-")


def flag_args(flags: dict[str, Any]) -> list[str]:
    """Command-line words of a flag set, in order: ``{"probes": False}`` -> ``--no-probes``."""
    words: list[str] = []
    for key, value in flags.items():
        if isinstance(value, bool):
            words.append(f"--{key}" if value else f"--no-{key}")
        else:
            words += [f"--{key}", "none" if value is None else str(value)]
    return words


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def run_name(own: dict[str, Any]) -> str:
    """A stable, filesystem-safe name from the settings that differ from base, in their
    order: ``{"balance": "aux", "scope": "sequence"}`` -> ``balance-aux_scope-sequence``."""
    if not own:
        return "base"
    parts = [f"{k}-{_value_text(v)}" for k, v in own.items()]
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", p) for p in parts)


def _flag_set(raw: Any, where: str, known: dict[str, argparse.Action]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise GridError(f"{where}: expected a mapping of train flag -> value, got {raw!r}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        k = normalise_key(key)
        if k in RESERVED:
            raise GridError(f"{where}: flag --{k} is not allowed in a grid: {RESERVED[k]}")
        if k not in known:
            close = [n for n in known if k in n or n in k][:5]
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise GridError(
                f"{where}: unknown train flag --{k}{hint}; see moe-testbed train --help"
            )
        if isinstance(value, (dict, list)):
            raise GridError(f"{where}: --{k} must be a single value, got {value!r}")
        out[k] = value
    return out


def check_flags(flags: dict[str, Any], where: str, parser: argparse.ArgumentParser) -> Any:
    """Parse ``flags`` as ``moe-testbed train`` would and validate the resulting config
    (without looking at this machine); returns the ``RunConfig``. Raises GridError naming
    ``where`` and the flag."""
    from moe_testbed.config import ConfigError, flag
    from moe_testbed.flags import resolve

    try:
        ns = parser.parse_args(flag_args(flags))
        return resolve(ns)
    except argparse.ArgumentError as err:
        raise GridError(f"{where}: {err}") from None
    except ConfigError as err:
        raise GridError(f"{where}: {flag(err.field)}: {err}") from None
    except (ValueError, FileNotFoundError) as err:
        raise GridError(f"{where}: {err}") from None


def load_grid(spec: str | Path, overrides: dict[str, Any] | None = None) -> Grid:
    """Read and check a grid (shipped name or file). ``overrides`` (flag -> value, from
    ``sweep --set``) replace base values for every run without changing the run names.

    Raises GridError naming the file, the run index and the flag of the first problem.
    """
    import yaml

    path = grid_path(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise GridError(f"{path}: not a readable YAML file: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise GridError(f"{path}: expected a mapping with 'base' and 'runs', got {data!r}")
    extra = sorted(set(data) - {"description", "base", "runs"})
    if extra:
        raise GridError(f"{path}: unknown top-level keys {extra}; expected description, base, runs")
    parser = train_parser()
    known = known_flags(parser)
    base = _flag_set(data.get("base"), f"{path}: base", known)
    base.update(_flag_set(overrides or {}, "--set", known))
    raw_runs = data.get("runs")
    if not isinstance(raw_runs, list) or not raw_runs:
        raise GridError(f"{path}: 'runs' must be a non-empty list of flag sets, got {raw_runs!r}")
    runs: list[Run] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_runs):
        where = f"{path}: runs[{i}]"
        explicit = raw.pop("name", None) if isinstance(raw, dict) else None
        own = _flag_set(raw, where, known)
        flags = {**base, **own}
        differs = {k: v for k, v in own.items() if k not in base or base[k] != v}
        name = str(explicit) if explicit is not None else run_name(differs)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", name):
            raise GridError(f"{where}: name must be letters, digits and . + _ -, got {name!r}")
        if name in seen:
            raise GridError(
                f"{where}: run name {name!r} repeats runs[{seen[name]}] (same settings? give "
                "one a 'name:')"
            )
        seen[name] = i
        cfg = check_flags(flags, where, parser)
        runs.append(Run(name=name, flags=flags, own=differs, steps=cfg.train.steps))
    return Grid(
        name=path.stem,
        path=path,
        description=str(data.get("description") or ""),
        base=base,
        runs=runs,
    )


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["steps=50", "probes=false"]`` -> ``{"steps": "50", "probes": False}`` (YAML values).
    Raises GridError for an item without ``=``."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GridError(f"--set: expected KEY=VALUE (a train flag and its value), got {item!r}")
        parsed = yaml.safe_load(value) if value.strip() else None
        out[normalise_key(key)] = parsed if isinstance(parsed, (bool, type(None))) else value
    return out
