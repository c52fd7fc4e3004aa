"""A ``RunConfig`` from a config file and command-line flags: ``moe-testbed train``'s flags (one
per config field, from each field's metadata), ``--config FILE`` (YAML or JSON) and
``--preset``, resolved as preset < file < flags (see ``moe_testbed.config``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moe_testbed.config import (
    PRESET_MOE,
    PRESETS,
    SECTIONS,
    RunConfig,
    _convert,
    _fields,
    _flag,
    apply_overrides,
    default_moe,
    get_preset,
    validate,
)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON config file into a nested dict.

    Raises FileNotFoundError for a missing file, ValueError naming the file for another suffix,
    invalid content (with the parser's line and column) or a top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not found"
        raise FileNotFoundError(f"--config: expected a YAML or JSON file, got {path} ({what})")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"--config: file must end in .yaml, .yml or .json, got {path.name}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:  # JSONDecodeError, YAMLError, UnicodeDecodeError
        where = str(err).replace("\n", " ")
        raise ValueError(
            f"--config: {path} is not valid {path.suffix[1:].upper()}: {where}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping at top level")
    return data


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (default: not given), plus ``--config`` and ``--preset``.

    Help text and choices come from each field's metadata; the default shown is the field's
    (the preset's model sizes apply on top, see ``PRESETS``).
    """
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON run config")
    parser.add_argument(
        "--preset",
        help=f"model size preset, one of {', '.join(PRESETS)} (default tiny); "
        + ", ".join(f"{n} also sets {d}" for n, d in PRESET_MOE.items()),
    )
    defaults = RunConfig()
    for section, cls in SECTIONS.items():
        title = cls.__doc__.splitlines()[0].replace("``", "")
        group = parser.add_argument_group(f"{section} ({title})")
        for name, (tp, f) in _fields(cls).items():
            default = getattr(getattr(defaults, section), name)
            help_text = f"{f.metadata['help']} (default {default})"
            kw: dict[str, Any] = dict(dest=f"{section}.{name}", default=argparse.SUPPRESS)
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                choices = f.metadata.get("choices")
                kw["type"] = _flag_type(tp, _flag(name), choices)
                kw["metavar"] = "{" + ",".join(map(str, choices)) + "}" if choices else name.upper()
            if f.metadata.get("replaced_by"):  # refused with a pointer, not listed in --help
                help_text = argparse.SUPPRESS
            group.add_argument(_flag(name), help=help_text.replace("%", "%%"), **kw)


def _flag_type(tp: Any, flag: str, choices: tuple | None):
    def parse(text: str) -> Any:
        try:
            return _convert(text, tp, flag, choices)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = flag
    return parse


def resolve(args: argparse.Namespace) -> RunConfig:
    """Preset < file < flags. Raises ValueError on an unknown preset, bad file content or an
    inconsistent result (see :func:`validate`)."""
    file_d = load_file(args.config) if getattr(args, "config", None) else {}
    preset = getattr(args, "preset", None) or file_d.get("preset", "tiny")
    cfg = RunConfig(preset=preset)
    cfg.model = get_preset(preset)
    cfg.moe = default_moe(**PRESET_MOE.get(preset, {}))
    apply_overrides(
        cfg, {k: v for k, v in file_d.items() if k != "preset"}, origin=str(args.config)
    )
    replaced = {
        f"{section}.{name}": f.metadata["replaced_by"]
        for section, cls in SECTIONS.items()
        for name, (_, f) in _fields(cls).items()
        if f.metadata.get("replaced_by")
    }
    flags: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key in replaced:
            flag = _flag(key.split(".", 1)[1])
            raise ValueError(f"{flag}: no longer used (got {value}); give {replaced[key]}")
        if "." in key:
            section, name = key.split(".", 1)
            flags.setdefault(section, {})[name] = value
    apply_overrides(cfg, flags, origin="flags")
    validate(cfg, resources=False)  # the caller checks the machine (validate)
    return cfg
