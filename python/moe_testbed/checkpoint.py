"""Checkpoint files of a run: everything the next optimizer step depends on, written atomically.

``RUN_DIR/checkpoints/last.pt`` holds the trainer's state (model, optimizer, scheduler, data
position, every RNG, the drained routing statistics, counters, the config); the checkpoint
before it is kept as ``previous.pt``. Under ``torch.distributed`` each rank also writes
``rank{r}.pt`` (and keeps ``rank{r}.previous.pt``) with what differs between ranks
(``RANK_LOCAL``: its data position and RNG states, plus the step); :func:`load` merges the one
of the same step back. Saving serialises the state first, then renames ``last.pt`` to
``previous.pt`` and writes the new ``last.pt`` atomically (temporary name, fsync, rename), so a
crash at any moment leaves at least one complete checkpoint: :func:`load` takes ``last.pt``
or, when it is missing or unreadable (then with a warning), ``previous.pt``.

Resuming (:func:`open_run`, :func:`check_resume`): the checkpoint's config must equal the new
one except in ``RESUME_FREE`` fields (steps, logging/eval/checkpoint cadence, display); other
differences need ``allow_config_change``, and ``RESUME_FIXED`` fields (model sizes, experts,
router, data, seed, micro-batch size) cannot differ at all.
"""

from __future__ import annotations

import io
import os
import random
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from moe_testbed import runstart
from moe_testbed.config import RunConfig
from moe_testbed.rundir import RunDir, atomic_write_bytes
from moe_testbed.runstart import RunDirError

__all__ = [
    "CKPT",
    "PREVIOUS",
    "RESUME_FIXED",
    "RESUME_FREE",
    "ConfigChangeError",
    "RANK_LOCAL",
    "Loaded",
    "check_resume",
    "describe_error",
    "exists",
    "load",
    "open_run",
    "resume_changes",
    "resume_kind",
    "rng_state",
    "save",
    "set_rng_state",
]

CKPT = "last.pt"
PREVIOUS = "previous.pt"
RANK_LOCAL = ("data", "rng")


def rng_state() -> dict[str, Any]:
    """The state of every RNG the run draws from: torch (CPU, and CUDA when present), numpy
    and Python's ``random``."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_names(rank: int) -> tuple[str, str]:
    return f"rank{rank}.pt", f"rank{rank}.previous.pt"


def _write(folder: Path, name: str, previous: str, state: dict[str, Any]) -> None:
    """Serialise, keep the current file as ``previous``, then move the new one in."""
    buf = io.BytesIO()
    torch.save(state, buf)
    if (folder / name).exists():
        os.replace(folder / name, folder / previous)
    atomic_write_bytes(folder / name, buf.getvalue())


def exists(run_dir: RunDir) -> bool:
    """Whether ``run_dir`` has a checkpoint to resume from (readable or not)."""
    return any((run_dir.checkpoints_dir / n).exists() for n in (CKPT, PREVIOUS))


def save(run_dir: RunDir, state: dict[str, Any], *, rank: int = 0, world: int = 1) -> None:
    """Write ``state`` (every rank calls it): rank 0 writes ``last.pt``; with ``world > 1``
    every rank first writes its ``RANK_LOCAL`` entries to ``rank{r}.pt``, with barriers so no
    rank runs ahead of a half-written checkpoint."""
    folder = run_dir.checkpoints_dir
    if world > 1:
        local = {k: state[k] for k in RANK_LOCAL}
        local["step"] = state["step"]
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder, *_rank_names(rank), local)
        dist.barrier()
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder, CKPT, PREVIOUS, state)
    if world > 1:
        dist.barrier()


class ConfigChangeError(ValueError):
    """Resuming would change what the checkpoint was trained with; the message lists the
    differences and the ways on."""


class Loaded(NamedTuple):
    """A checkpoint read back: the state, the file it came from and the newer files that
    could not be read (name, reason)."""

    state: dict[str, Any]
    path: Path
    skipped: list[tuple[str, str]]


def _read(path: Path, device: torch.device | str) -> dict[str, Any]:
    state = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError("not a checkpoint of this trainer (no 'step')")
    return state


def describe_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def load(run_dir: RunDir, *, device: torch.device, rank: int = 0, world: int = 1) -> Loaded:
    """The newest readable checkpoint, with this rank's ``RANK_LOCAL`` entries of the same
    step when ``world > 1``. A missing or unreadable ``last.pt`` falls back to
    ``previous.pt`` with a warning on stderr (rank 0).

    Raises RunDirError when no checkpoint file can be read (naming each file and why).
    """
    folder = run_dir.checkpoints_dir
    skipped: list[tuple[str, str]] = []
    for name in (CKPT, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            state = _read(path, device)
        except Exception as err:  # truncated, garbage or foreign: try the older one
            skipped.append((name, describe_error(err)))
            continue
        if world > 1:
            state.update(_rank_local(folder, rank, state["step"]))
        if skipped and rank == 0:
            why = "; ".join(f"{n}: {r}" for n, r in skipped)
            print(
                f"moe-testbed: warning: unreadable checkpoint ({why}); resuming from {name} "
                f"(step {state['step']})",
                file=sys.stderr,
                flush=True,
            )
        return Loaded(state, path, skipped)
    why = "; ".join(f"{n}: {r}" for n, r in skipped) or "no checkpoint files"
    raise RunDirError(
        f"out: no readable checkpoint in {folder} ({why}); start over with --no-resume (the "
        "directory's contents are moved aside, not deleted)"
    )


def _rank_local(folder: Path, rank: int, step: int) -> dict[str, Any]:
    """This rank's entries saved at ``step`` (``rank{r}.pt`` or the one before it)."""
    for name in _rank_names(rank):
        path = folder / name
        if not path.exists():
            continue
        try:
            local = torch.load(path, weights_only=False)
        except Exception:
            continue
        if local.get("step", step) == step:
            return {k: local[k] for k in RANK_LOCAL}
    raise RunDirError(
        f"out: {folder} has no readable {_rank_names(rank)[0]} of step {step} for rank {rank}; "
        "start over with --no-resume"
    )


# ----------------------------------------------------------------------------- resuming

# Fields a resumed run may change freely (length, cadence, display), and fields that shape the
# checkpoint or the data stream, which cannot change even with --allow-config-change ("model."
# covers the section). Every other change needs --allow-config-change.
RESUME_FREE = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.ckpt_every",
    "train.progress",
    "train.tensorboard",
    "train.threads",
)
RESUME_FIXED = (
    "model.",
    "moe.router",
    "moe.num_experts",
    "moe.num_groups",
    "moe.shared_experts",
    "moe.activation",
    "moe.expert_bias",
    "data.data_dir",
    "data.domains",
    "data.tokenizer_vocab",
    "data.data_seed",
    "train.seed",
    "train.micro_batch_size",
)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict[str, Any], cfg: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``field -> (saved value, new value)`` for every field of ``cfg`` that differs from the
    ``saved`` config dict (fields missing on either side are skipped). ``model.vocab_size=0``
    and the reference router's ``moe.num_groups=None`` stand for what the trainer derives, so
    they equal any saved value."""
    old, new = _flat(saved), _flat(cfg.to_dict())
    derived = {"model.vocab_size": 0, "moe.num_groups": None}
    return {
        k: (old[k], v)
        for k, v in new.items()
        if k in old and old[k] != v and not (k in derived and v == derived[k])
    }


def resume_kind(field: str) -> str:
    """``"free"``, ``"fixed"`` or ``"allowed"`` (with --allow-config-change) for a field."""
    if field in RESUME_FREE:
        return "free"
    if any(field == f or (f.endswith(".") and field.startswith(f)) for f in RESUME_FIXED):
        return "fixed"
    return "allowed"


def check_resume(
    saved: dict[str, Any], cfg: RunConfig, *, step: int, allow_config_change: bool, where: Path
) -> dict[str, tuple[Any, Any]]:
    """The differences between a checkpoint's config (``saved``, a dict) and the new ``cfg``,
    when resuming is allowed with them.

    Raises ConfigChangeError listing every difference when one is neither free
    (``RESUME_FREE``) nor allowed by ``allow_config_change``, or is fixed (``RESUME_FIXED``),
    or when ``cfg.train.steps`` is below the checkpoint's ``step``.
    """
    changes = resume_changes(saved, cfg)
    if cfg.train.steps < step:
        raise ConfigChangeError(
            f"train.steps must be >= the checkpoint's step {step} to resume in {where}, got "
            f"{cfg.train.steps}"
        )
    listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
    fixed = [k for k in changes if resume_kind(k) == "fixed"]
    if fixed:
        raise ConfigChangeError(
            f"out: {where} holds a run whose checkpoint cannot take these changes ({listed}; "
            f"{', '.join(fixed)} shape the checkpoint or the data); resume with the saved "
            "values or start over with --no-resume (the old run is moved aside)"
        )
    needs_flag = [k for k in changes if resume_kind(k) == "allowed"]
    if needs_flag and not allow_config_change:
        raise ConfigChangeError(
            f"out: {where} holds a run with a different config ({listed}); resume with the "
            "saved values, pass --allow-config-change to resume with the new ones (recorded in "
            "history.jsonl), or start over with --no-resume (the old run is moved aside)"
        )
    return changes


def open_run(
    run_dir: RunDir,
    cfg: RunConfig,
    *,
    resume: bool,
    allow_config_change: bool,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> tuple[Loaded | None, dict[str, tuple[Any, Any]]]:
    """Open ``run_dir`` for a run of ``cfg`` (rank 0 holding its lock): finish an interrupted
    set-aside and remove stale temporary files, then resume from the newest readable
    checkpoint when ``resume`` and :func:`check_resume` allow it, or else move an earlier run
    aside (``moe_testbed.runstart.set_aside``) and record the start in ``history.jsonl``.

    Every rank calls it (with barriers) and gets the same answer: the checkpoint (None for a
    fresh start) and the config changes. Raises what :func:`load`, :func:`check_resume` and
    ``set_aside`` raise.
    """
    if rank == 0:
        runstart.finish_set_aside(run_dir)
        runstart.remove_stale_temp(run_dir)
    if world > 1:
        dist.barrier()  # every rank sees the directory as rank 0 left it
    loaded, changes = None, {}
    if resume and exists(run_dir):
        loaded = load(run_dir, device=device, rank=rank, world=world)
        changes = check_resume(
            loaded.state["config"],
            cfg,
            step=loaded.state["step"],
            allow_config_change=allow_config_change,
            where=run_dir.path,
        )
    elif rank == 0:
        moved = runstart.set_aside(run_dir)
        if moved is not None:
            print(f"moe-testbed: earlier run in {run_dir.path} moved to {moved}", flush=True)
        run_dir.append_history("start", step=0, set_aside=moved.name if moved else None)
    if world > 1:
        dist.barrier()
    return loaded, changes
