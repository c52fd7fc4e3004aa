"""Typed run configuration: model, MoE routing, data and training settings.

One ``RunConfig`` describes a run. It is built in three layers, later ones winning:

1. the preset (``presets.PRESETS[name]``) for the model sizes,
2. a YAML or JSON file (``--config run.yaml``), nested by section::

       preset: tiny
       moe: {router: learned, balance: aux, scope: global_batch}
       train: {steps: 200, lr: 3.0e-3}

3. command-line flags, one per field (``--router``, ``--steps``, ``--d-model`` ...).

Every field of every section is reachable from both the file and the flags; flag names are the
field names with dashes, unique across sections. The resolved config is written to the run
directory as ``config.json`` and loads back to an equal ``RunConfig``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

Router = Literal[
    "learned", "frozen", "random", "hash", "reference", "expert_choice", "sequence", "shared_router"
]
Scope = Literal["sequence", "micro_batch", "global_batch"]


@dataclass
class ModelConfig:
    """Decoder-only transformer sizes. ``vocab_size=0`` takes the tokenizer's vocabulary."""

    vocab_size: int = 0
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff_expert: int = 128
    d_ff_dense: int = 512  # hidden size of the dense FFN in layers without MoE (moe_every > 1)
    moe_every: int = 1  # every n-th layer (counting from the last) is an MoE layer
    seq_len: int = 128
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


@dataclass
class MoESettings:
    """The ``moe_kernels.MoEConfig`` fields (shared/ROUTING.md)."""

    router: Router = "learned"
    score: Literal["softmax", "sigmoid"] = "softmax"
    top_k: int = 2
    num_experts: int = 8
    normalize: bool = True
    jitter: float = 0.0
    balance: Literal["aux", "aux_free", "none"] = "aux"
    scope: Scope = "global_batch"
    aux_coef: float = 0.01
    z_coef: float = 1e-3
    bias_rate: float = 1e-3
    bias_rule: Literal["sign", "mean_centred"] = "sign"
    capacity_factor: float | None = None
    drop: Literal["position", "score"] = "position"
    num_groups: int | None = None
    shared_experts: int = 0
    activation: Literal["swiglu", "gelu"] = "swiglu"


@dataclass
class DataConfig:
    """Where tokens come from. ``data_dir=None`` uses the sample shipped in the package."""

    data_dir: str | None = None  # "synthetic" = generated domains (tests, benchmarks)
    domains: str | None = None  # comma-separated subset of the corpus's domains; None = all
    tokenizer_vocab: int = 4096
    eval_batches: int = 2  # validation batches per domain at each eval


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing."""

    steps: int = 200
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    deterministic: bool = False
    compile: bool = False
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 50
    ckpt_every: int = 50
    stats: bool = True
    probes: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    """A whole run: preset name plus the four sections."""

    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoESettings = field(default_factory=MoESettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a nested dict; unknown keys and bad values raise ValueError."""
        cfg = cls(preset=str(d.get("preset", "tiny")))
        apply_overrides(cfg, d, origin="config")
        return cfg


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "moe": MoESettings,
    "data": DataConfig,
    "train": TrainConfig,
}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Check/convert one value to the field type ``tp``; raise ValueError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], name)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{name} must be a boolean, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return out
    if tp is str:
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {name}")


def apply_overrides(cfg: RunConfig, d: dict[str, Any], origin: str = "config") -> RunConfig:
    """Set the fields named in the nested dict ``d`` on ``cfg`` (in place), validating each."""
    for key, value in d.items():
        if key == "preset":
            cfg.preset = str(value)
            continue
        if key not in SECTIONS:
            raise ValueError(
                f"{origin}: unknown section {key!r}; expected one of {['preset', *SECTIONS]}"
            )
        if not isinstance(value, dict):
            raise ValueError(f"{origin}: section {key!r} must be a mapping, got {value!r}")
        section = getattr(cfg, key)
        hints = _hints(type(section))
        for name, v in value.items():
            if name not in hints:
                raise ValueError(
                    f"{origin}: unknown field {key}.{name}; fields of {key}: {sorted(hints)}"
                )
            setattr(section, name, _convert(v, hints[name], f"{key}.{name}"))
    return cfg


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON config file into a nested dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file must end in .yaml, .yml or .json, got {path.name}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level")
    return data


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (or YAML when the name ends in .yaml/.yml)."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    else:
        path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------- flags


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (default: not given), plus ``--config`` and ``--preset``."""
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON run config")
    parser.add_argument("--preset", help="model size preset (tiny, small, base, large)")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__doc__.splitlines()[0]})")
        for f in dataclasses.fields(cls):
            tp = _hints(cls)[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw: dict[str, Any] = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS)
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
                kw["help"] = f"(default {default})"
            else:
                kw["type"] = _flag_type(tp, f"{_flag(f.name)}")
                choices = _choices(tp)
                kw["metavar"] = "{" + ",".join(choices) + "}" if choices else f.name.upper()
                kw["help"] = f"(default {default})"
            group.add_argument(_flag(f.name), **kw)


def _choices(tp: Any) -> tuple[str, ...] | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return None


def _flag_type(tp: Any, flag: str):
    def parse(text: str) -> Any:
        try:
            return _convert(text, tp, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = flag
    return parse


def resolve(args: argparse.Namespace) -> RunConfig:
    """Preset < file < flags. Raises ValueError on an unknown preset or bad file content."""
    from moe_testbed.presets import get_preset

    file_d = load_file(args.config) if getattr(args, "config", None) else {}
    preset = getattr(args, "preset", None) or file_d.get("preset", "tiny")
    cfg = RunConfig(preset=preset)
    cfg.model = get_preset(preset)
    apply_overrides(
        cfg, {k: v for k, v in file_d.items() if k != "preset"}, origin=str(args.config)
    )
    flags: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            flags.setdefault(section, {})[name] = value
    apply_overrides(cfg, flags, origin="flags")
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks, raising ValueError with the offending values."""
    m, moe, t = cfg.model, cfg.moe, cfg.train
    if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
        raise ValueError(
            f"model.d_model ({m.d_model}) must split into n_heads ({m.n_heads}) heads of even size"
        )
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ValueError(
            f"moe.top_k must be in [1, num_experts={moe.num_experts}], got {moe.top_k}"
        )
    if m.moe_every < 1 or m.n_layers < 1:
        raise ValueError("model.moe_every and model.n_layers must be >= 1")
    if t.steps < 1 or t.micro_batch_size < 1 or t.grad_accum < 1:
        raise ValueError("train.steps, train.micro_batch_size and train.grad_accum must be >= 1")
    for name in ("log_every", "eval_every", "ckpt_every"):
        if getattr(t, name) < 0:
            raise ValueError(f"train.{name} must be >= 0 (0 = off), got {getattr(t, name)}")
