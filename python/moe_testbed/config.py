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
unique across sections. The resolved config is written to the run directory as ``config.json``
and loads back to an equal ``RunConfig``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from moe_kernels import MoEConfig


def _field(default: Any, help: str, choices: tuple | None = None) -> Any:
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


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

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) has an MoE FFN: every ``moe_every``-th block counting
        from the last, so with ``moe_every=2`` the last block is MoE, as in many MoE models."""
        return (self.n_layers - 1 - layer) % self.moe_every == 0


def default_moe(**overrides: Any) -> MoEConfig:
    """The testbed's ``MoEConfig``: the layer's defaults except ``scope="global_batch"``.

    The testbed balances over the whole optimizer step by default: one micro-batch holds only a
    few domains, and balancing each micro-batch on its own pushes every domain onto every
    expert, which suppresses the specialization the testbed measures (``docs/ROUTING.md``,
    "Balancing scope"). The layer keeps ``micro_batch`` as its own default because a layer used
    alone knows nothing of the optimizer step. ``overrides`` set any other field.
    """
    return MoEConfig(**{"scope": "global_batch", **overrides})


@dataclass
class DataConfig:
    """Where tokens come from. ``data_dir=None`` uses the sample shipped in the package."""

    data_dir: str | None = _field(
        None, "corpus directory, 'prepared', 'synthetic' (generated domains); None = the sample"
    )
    domains: str | None = _field(None, "comma-separated subset of the corpus's domains; None = all")
    tokenizer_vocab: int = _field(4096, "vocabulary size of the byte-level BPE tokenizer")
    eval_batches: int = _field(2, "validation micro-batches per domain at each evaluation")


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
        validate(cfg)
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
    "small": ModelConfig(d_model=256, n_layers=6, n_heads=4, d_ff_expert=256, d_ff_dense=1024),
    "base": ModelConfig(
        d_model=384, n_layers=8, n_heads=6, d_ff_expert=384, d_ff_dense=1536, seq_len=256
    ),
    "large": ModelConfig(
        d_model=512, n_layers=11, n_heads=8, d_ff_expert=512, d_ff_dense=2048, seq_len=256
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset. Raises ValueError listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
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
            setattr(section, name, _convert(v, tp, f"{key}.{name}", f.metadata.get("choices")))
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
    """One flag per config field (default: not given), plus ``--config`` and ``--preset``.

    Help text and choices come from each field's metadata; the default shown is the field's
    (the preset's model sizes apply on top, see ``PRESETS``).
    """
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON run config")
    parser.add_argument(
        "--preset", help=f"model size preset, one of {', '.join(PRESETS)} (default tiny)"
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
    """Cross-field checks, raising ValueError with the offending values.

    The ``moe`` section is checked by ``MoEConfig.validate()`` (its messages get a ``moe.``
    prefix). ``router="reference"`` with ``num_groups=None`` is accepted: the trainer sets the
    number of groups to the corpus's domain count and validates again.
    """
    m, moe, t = cfg.model, cfg.moe, cfg.train
    if m.d_model % m.n_heads or (m.d_model // m.n_heads) % 2:
        raise ValueError(
            f"model.d_model ({m.d_model}) must split into n_heads ({m.n_heads}) heads of even size"
        )
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ValueError(
            f"moe.top_k must be in [1, num_experts={moe.num_experts}], got {moe.top_k}"
        )
    pending_groups = moe.router == "reference" and moe.num_groups is None
    try:
        # One group passes every group check; they run again once the domain count is known.
        checked = dataclasses.replace(moe, num_groups=1) if pending_groups else moe
        checked.validate()
    except ValueError as e:
        raise ValueError(f"moe.{e}") from None
    if m.moe_every < 1 or m.n_layers < 1:
        raise ValueError("model.moe_every and model.n_layers must be >= 1")
    if t.steps < 1 or t.micro_batch_size < 1 or t.grad_accum < 1:
        raise ValueError("train.steps, train.micro_batch_size and train.grad_accum must be >= 1")
    for name in ("log_every", "eval_every", "ckpt_every"):
        if getattr(t, name) < 0:
            raise ValueError(f"train.{name} must be >= 0 (0 = off), got {getattr(t, name)}")
    if t.expert_parallel < 1 or moe.num_experts % t.expert_parallel:
        raise ValueError(
            f"train.expert_parallel must be >= 1 and divide moe.num_experts={moe.num_experts}, "
            f"got {t.expert_parallel}"
        )
    if not t.dist_timeout > 0:
        raise ValueError(f"train.dist_timeout must be > 0 seconds, got {t.dist_timeout}")
