"""Typed run configuration: model, MoE routing, data and training settings, and the presets.

One ``RunConfig`` describes a run. It is built in three layers, later ones winning:

1. the preset (``PRESETS[name]``) for the model sizes,
2. a YAML or JSON file (``--config run.yaml``), nested by section::

       preset: tiny
       moe: {router: learned, balance: aux, scope: global_batch}
       train: {steps: 200, lr: 3.0e-3}

3. command-line flags, one per field (``--router``, ``--steps``, ``--d-model`` ...).

The ``moe`` section is ``moe_kernels.MoEConfig`` itself (definitions in ``docs/ROUTING.md``).
Every field of every section carries ``metadata={"help": ..., "choices": ...}``; the flags, their
help and the accepted values come from there, so a new field shows up everywhere at once. Every
field is reachable from both the file and the flags; flag names are the field names with dashes,
unique across sections (``moe_testbed.flags`` reads files and flags). The resolved config is
written to the run directory as ``config.json`` and loads back to an equal ``RunConfig``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from moe_kernels import MoEConfig


def _field(default: Any, help: str, choices: tuple | None = None, replaced_by: str = "") -> Any:
    """A config field; ``replaced_by``: kept only to read old configs (its flag names this)."""
    metadata = {"help": help, "choices": tuple(choices or ()), "replaced_by": replaced_by}
    return field(default=default, metadata={k: v for k, v in metadata.items() if v})


DENSE = ("none", "equal_active", "equal_total")  # ModelConfig.dense (moe_testbed.presets)


@dataclass
class ModelConfig:
    """Decoder-only transformer sizes. ``vocab_size=0`` takes the tokenizer's vocabulary."""

    vocab_size: int = _field(0, "vocabulary size; 0 = the tokenizer's")
    d_model: int = _field(128, "model width D")
    n_layers: int = _field(4, "transformer blocks")
    n_heads: int = _field(4, "attention heads (d_model / n_heads must be even)")
    d_ff_expert: int = _field(128, "hidden size F of every expert")
    d_ff_dense: int = _field(512, "hidden size of the dense FFN in layers without MoE")
    moe_every: int = _field(1, "every n-th block, counting from the last, has an MoE FFN")
    seq_len: int = _field(128, "tokens per training sequence (context length)")
    tie_embeddings: bool = _field(True, "share the input embedding and output projection")
    rope_theta: float = _field(10000.0, "rotary embedding base")
    norm_eps: float = _field(1e-5, "RMSNorm epsilon")
    dense: str = _field(
        "none", "dense baseline: MoE FFNs become SwiGLU of width k*F (equal_active) or E*F", DENSE
    )

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) has an MoE FFN: every ``moe_every``-th block counting
        from the last, so with ``moe_every=2`` the last block is MoE, as in many MoE models."""
        return (self.n_layers - 1 - layer) % self.moe_every == 0


def default_moe(**overrides: Any) -> MoEConfig:
    """The testbed's ``MoEConfig``: the layer's defaults except ``scope="global_batch"`` (one
    micro-batch holds few domains, and balancing it alone suppresses the specialization the
    testbed measures: ``docs/ROUTING.md``, "Balancing scope"); ``overrides`` set other fields."""
    return MoEConfig(**{"scope": "global_batch", **overrides})


@dataclass
class DataConfig:
    """Where tokens come from. ``data_dir=None`` uses the sample shipped in the package."""

    data_dir: str | None = _field(
        None, "corpus directory, 'prepared', 'synthetic' (generated domains); None = the sample"
    )
    domains: str | None = _field(None, "comma-separated subset of the corpus's domains; None = all")
    tokenizer_vocab: int = _field(4096, "vocabulary size of the byte-level BPE tokenizer")
    eval_batches: int = _field(2, "unused", replaced_by="--eval-tokens (tokens per domain)")
    eval_tokens: int = _field(8192, "validation tokens per domain (windows spread over documents)")
    eval_batch_size: int = _field(16, "sequences per validation batch (domains interleaved)")
    data_seed: int = _field(0, "seed of the document split and tokenizer (not train.seed)")
    batch_domains: str = _field(
        "mixed", "training micro-batches: mixed domains or one domain each", ("mixed", "single")
    )


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing."""

    steps: int = _field(200, "optimizer steps")
    micro_batch_size: int = _field(16, "sequences per micro-batch (per rank)")
    grad_accum: int = _field(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float = _field(3e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _field(0.1, "final learning rate of the cosine decay, relative to lr")
    warmup_steps: int = _field(20, "linear warmup steps")
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices only)")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    grad_clip: float = _field(1.0, "clip the gradient norm to this; 0 = off")
    seed: int = _field(0, "seed of initialisation, data order and every RNG")
    deterministic: bool = _field(False, "torch.use_deterministic_algorithms(True)")
    compile: bool = _field(False, "torch.compile the model")
    dtype: str = _field(
        "auto", "compute dtype: auto = bf16 autocast on GPU, fp32 on CPU", ("auto", "fp32", "bf16")
    )
    device: str = _field("auto", "torch device (cpu, cuda, cuda:1, ...); auto = GPU if any")
    log_every: int = _field(10, "log training metrics every n steps; 0 = off")
    eval_every: int = _field(50, "evaluate (validation loss, routing counts, probes) every n steps")
    ckpt_every: int = _field(50, "write a checkpoint every n steps; 0 = off")
    stats: bool = _field(True, "collect on-device routing statistics")
    probes: bool = _field(True, "run the routing probes at evaluations")
    progress: bool = _field(True, "show a progress bar")
    tensorboard: bool = _field(
        False, "also write every metric to OUT/tensorboard (extra: moe-testbed[tensorboard])"
    )
    expert_parallel: int = _field(
        1,
        "expert-parallel ranks: experts sharded over groups of this many ranks, the rest data "
        "parallel (torchrun; must divide the world size and moe.num_experts)",
    )
    dist_timeout: float = _field(
        300.0, "seconds a collective waits for the other ranks before the run stops with an error"
    )


@dataclass
class RunConfig:
    """A whole run: preset name plus the four sections."""

    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=default_moe)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a nested dict; unknown keys and bad values raise ValueError."""
        cfg = cls(preset=str(d.get("preset", "tiny")))
        apply_overrides(cfg, d, origin="config")
        validate(cfg, resources=False)  # a saved config may name another machine
        return cfg


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "data": DataConfig,
    "train": TrainConfig,
}

# ----------------------------------------------------------------------------- presets

# One MoE family: E=8 routed experts, top-2, expert width = d_model (see moe_testbed.presets for
# the parameter counts of each).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff_expert=128, d_ff_dense=512),
    "tiny_e16k4": ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff_expert=64, d_ff_dense=512),
    "small": ModelConfig(d_model=256, n_layers=6, n_heads=4, d_ff_expert=256, d_ff_dense=1024),
    "base": ModelConfig(
        d_model=384, n_layers=8, n_heads=6, d_ff_expert=384, d_ff_dense=1536, seq_len=256
    ),
    "large": ModelConfig(
        d_model=512, n_layers=11, n_heads=8, d_ff_expert=512, d_ff_dense=2048, seq_len=256
    ),
}


# MoE fields a preset sets besides the sizes (tiny_e16k4: tiny's parameters in 16 experts, top-4)
PRESET_MOE: dict[str, dict[str, Any]] = {"tiny_e16k4": {"num_experts": 16, "top_k": 4}}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset. Raises ValueError listing the presets."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


# ----------------------------------------------------------------------------- values


def _convert(value: Any, tp: Any, name: str, choices: tuple | None = None) -> Any:
    """Check/convert one value to the field type ``tp``; raise ValueError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], name, choices)
    if choices is not None:
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


def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """Field name -> (resolved type, field) of a config section."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def apply_overrides(cfg: RunConfig, d: dict[str, Any], origin: str = "config") -> RunConfig:
    """Set the fields named in the nested dict ``d`` on ``cfg`` (in place), converting each.

    Raises ValueError naming the section/field for unknown keys and bad values. Cross-field
    checks are :func:`validate`'s (call it once all overrides are in).
    """
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
        known = _fields(type(section))
        for name, v in value.items():
            if name not in known:
                raise ValueError(
                    f"{origin}: unknown field {key}.{name}; fields of {key}: {sorted(known)}"
                )
            tp, f = known[name]
            try:
                value = _convert(v, tp, f"{key}.{name}", f.metadata.get("choices"))
            except ValueError as err:
                where = "" if origin in ("config", "flags") else f"{origin}: "
                raise ConfigError(f"{key}.{name}", f"{where}{err}") from None
            setattr(section, name, value)
    return cfg


def save(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (or YAML when the name ends in .yaml/.yml)."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    else:
        path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------- flag names


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- validation


class ConfigError(ValueError):
    """An invalid config value. ``field`` is ``section.name`` (``"moe.top_k"``); the message
    names the field, the expected and the actual value; :func:`flag` gives the flag."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def flag(field: str) -> str:
    """The command-line flag of a config field: ``"train.lr"`` -> ``"--lr"``."""
    return _flag(field.rsplit(".", 1)[-1])


def _is_type(value: Any, tp: Any) -> bool:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_is_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _at_least(lo: float) -> tuple[Any, str]:
    return (lambda v: math.isfinite(v) and v >= lo), f">= {lo}"


_ABOVE_0 = ((lambda v: math.isfinite(v) and v > 0), "a finite number > 0")
_UNIT = ((lambda v: 0 <= v < 1), "in [0, 1)")
# Range of every numeric field (types are checked from the annotations; ``moe`` fields are
# MoEConfig.validate's, but num_experts comes first here, before the top_k check that uses it).
# A field added to a section later gets its type checked until it is listed here.
_RANGES: dict[str, tuple[Any, str]] = {
    "model.vocab_size": ((lambda v: v >= 0), ">= 0 (0 = the tokenizer's)"),
    **{
        f"model.{n}": _at_least(1)
        for n in ("d_model", "n_layers", "n_heads", "d_ff_expert", "d_ff_dense", "moe_every")
    },
    "model.seq_len": _at_least(1),
    "model.rope_theta": _ABOVE_0,
    "model.norm_eps": _ABOVE_0,
    "moe.num_experts": _at_least(1),  # before the top_k check that divides by it
    "data.tokenizer_vocab": ((lambda v: 512 <= v <= 65536), "in [512, 65536]"),
    "data.eval_batches": ((lambda v: v >= 1), ">= 1 (no evaluation: --eval-every 0)"),
    "data.eval_tokens": _at_least(1),
    "data.eval_batch_size": _at_least(1),
    "data.data_seed": ((lambda v: 0 <= v < 2**32), "in [0, 2**32)"),
    **{f"train.{n}": _at_least(1) for n in ("steps", "micro_batch_size", "grad_accum")},
    "train.lr": _ABOVE_0,
    "train.min_lr_ratio": ((lambda v: 0 <= v <= 1), "in [0, 1]"),
    "train.warmup_steps": _at_least(0),
    "train.weight_decay": _at_least(0),
    "train.beta1": _UNIT,
    "train.beta2": _UNIT,
    "train.grad_clip": ((lambda v: math.isfinite(v) and v >= 0), ">= 0 (0 = off)"),
    "train.seed": ((lambda v: 0 <= v < 2**32), "in [0, 2**32)"),
    "train.expert_parallel": _at_least(1),
    "train.dist_timeout": _ABOVE_0,
    **{
        f"train.{n}": ((lambda v: v >= 0), ">= 0 (0 = off)")
        for n in ("log_every", "eval_every", "ckpt_every")
    },
}
SYNTHETIC_DOMAINS = 8  # moe_testbed.sources.SyntheticData's domain count


def validate(cfg: RunConfig, *, resources: bool = True) -> None:
    """Check every field of ``cfg``: type, range, choices, the cross-field rules and, with
    ``resources``, what the run will need from this machine (the device, the corpus directory
    and its domains, the number of reference groups against the domains, the model vocabulary
    against the tokenizer's). Reads at most the corpus manifest: nothing loads or trains.

    ``router="reference"`` with ``num_groups=None`` is accepted (the trainer sets the number of
    groups to the corpus's domain count). Raises ConfigError (a ValueError) naming the first
    invalid field, the expected and the actual value.
    """
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg: expected a RunConfig, got {type(cfg).__name__}")
    if cfg.preset not in PRESETS:
        raise ConfigError("preset", f"preset must be one of {list(PRESETS)}, got {cfg.preset!r}")
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        if not isinstance(obj, cls):
            raise ConfigError(
                section, f"{section} must be a {cls.__name__}, got {type(obj).__name__}"
            )
        for name, (tp, f) in _fields(cls).items():
            key, value = f"{section}.{name}", getattr(obj, name)
            if not _is_type(value, tp):
                tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
                raise ConfigError(key, f"{key} must be {tname}, got {value!r}")
            choices = f.metadata.get("choices")
            if choices is not None and section != "moe" and value not in choices:
                raise ConfigError(key, f"{key} must be one of {list(choices)}, got {value!r}")
            if key in _RANGES and not _RANGES[key][0](value):
                raise ConfigError(key, f"{key} must be {_RANGES[key][1]}, got {value!r}")
    m, moe = cfg.model, cfg.moe
    if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
        raise ConfigError(
            "model.n_heads",
            f"model.d_model ({m.d_model}) must split into n_heads ({m.n_heads}) heads of even size",
        )
    if isinstance(moe.top_k, int) and isinstance(moe.num_experts, int):
        if not 1 <= moe.top_k <= moe.num_experts:
            raise ConfigError(
                "moe.top_k",
                f"moe.top_k must be in [1, num_experts={moe.num_experts}], got {moe.top_k}",
            )
    if isinstance(moe.num_experts, int) and moe.num_experts % cfg.train.expert_parallel:
        raise ConfigError(
            "train.expert_parallel",
            f"train.expert_parallel must divide moe.num_experts={moe.num_experts}, "
            f"got {cfg.train.expert_parallel}",
        )
    groups = moe.num_groups
    if resources:
        _check_device(cfg.train.device)
        domains = corpus_domains(cfg)
        _check_vocab(cfg)
        if moe.router == "reference":
            if groups is not None and groups != len(domains):
                raise ConfigError(
                    "moe.num_groups",
                    f"moe.num_groups must equal the number of domains ({len(domains)}: "
                    f"{','.join(domains)}) or be None, got {groups}",
                )
            groups = len(domains)
    elif moe.router == "reference" and groups is None:
        groups = 1  # passes every group check; the trainer checks again with the domain count
    _check_moe(moe, groups)


def _check_moe(moe: MoEConfig, groups: int | None) -> None:
    try:  # replace() validates the copy it builds
        (
            dataclasses.replace(moe, num_groups=groups) if groups != moe.num_groups else moe
        ).validate()
    except (ValueError, TypeError, KeyError) as err:
        text = str(err).strip("'\"") if isinstance(err, KeyError) else str(err)
        name = text.split(":", 1)[0] if ":" in text.split(" ", 1)[0] else "router"
        raise ConfigError(f"moe.{name}", f"moe.{text}") from None


def _check_device(spec: str) -> None:
    try:
        device = None if spec == "auto" else torch.device(spec)
    except (RuntimeError, ValueError):
        device = torch.device("meta")  # not a device name: refused below
    if device is None or device.type == "cpu":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type != "cuda" or count == 0 or (device.index or 0) >= count:
        have = f"cuda:0..cuda:{count - 1}" if count else "no CUDA device"
        raise ConfigError(
            "train.device",
            f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N' on a device this machine "
            f"has ({have}), got {spec!r}",
        )


def corpus_domains(cfg: RunConfig) -> list[str]:
    """The domains the run will train on, in label order, from the corpus manifest alone.

    Raises ConfigError naming ``data.data_dir`` (no such corpus) or ``data.domains``.
    """
    d = cfg.data
    if d.data_dir == "synthetic":
        if d.domains is not None:
            raise ConfigError(
                "data.domains",
                f"data.domains must be None with data_dir='synthetic' (its {SYNTHETIC_DOMAINS} "
                f"domains are fixed), got {d.domains!r}",
            )
        return [f"synthetic{i}" for i in range(SYNTHETIC_DOMAINS)]
    from moe_testbed.data.corpus import select_domains

    try:
        return select_domains(d.data_dir or "sample", d.domains)[2]
    except (FileNotFoundError, ValueError) as err:
        text = str(err).removeprefix("source: ").removeprefix("domains: ")
        if str(err).startswith("domain"):
            raise ConfigError("data.domains", f"data.domains: {text}") from None
        raise ConfigError(
            "data.data_dir",
            f"data.data_dir must be 'synthetic', 'sample', 'prepared' or a corpus directory, "
            f"got {d.data_dir!r}: {text}",
        ) from None


def _check_vocab(cfg: RunConfig) -> None:
    v = cfg.model.vocab_size
    if cfg.data.data_dir == "synthetic":
        if 0 < v <= SYNTHETIC_DOMAINS:
            raise ConfigError(
                "model.vocab_size",
                f"model.vocab_size must be 0 or > {SYNTHETIC_DOMAINS} for the synthetic domains, "
                f"got {v}",
            )
    elif 0 < v < cfg.data.tokenizer_vocab:
        raise ConfigError(
            "model.vocab_size",
            f"model.vocab_size must be 0 (the tokenizer's) or >= data.tokenizer_vocab "
            f"({cfg.data.tokenizer_vocab}), got {v}",
        )
