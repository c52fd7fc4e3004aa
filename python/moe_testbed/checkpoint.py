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

Expert parallelism: each rank's file also holds its experts and their optimizer state, which
``last.pt`` then leaves out (:class:`ExpertShard`). Every file records the step, the world size
and the expert-parallel size, so a resume takes the rank files of ``last.pt``'s (or
``previous.pt``'s) step: a crash between the rank files and ``last.pt`` never mixes two
checkpoints. An expert-parallel run resumes on the same world size; the expert-parallel size may
change (:func:`place_experts` re-shards: the saved shards are concatenated and this rank's block
cut out) to any size dividing both the world size and the number of experts; anything else
stops with a ValueError naming the allowed sizes.

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

from moe_kernels import parallel
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
    "ExpertShard",
    "RANK_LOCAL",
    "Loaded",
    "check_resume",
    "describe_error",
    "exists",
    "load",
    "open_run",
    "place_experts",
    "resume_changes",
    "resume_kind",
    "rng_state",
    "save",
    "set_rng_state",
]

CKPT = "last.pt"
PREVIOUS = "previous.pt"
RANK_LOCAL = ("data", "rng")


class ExpertShard(NamedTuple):
    """Which entries of the trainer state are this rank's expert shard: the model state-dict
    keys of the sharded expert tensors (expert dimension first), the optimizer state ids of
    their parameters, this rank's index in its EP group and the group's size."""

    model_keys: tuple[str, ...]
    optimizer_ids: tuple[int, ...]
    ep_rank: int
    ep_size: int

    @classmethod
    def of(
        cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ep: parallel.EPGroup | None
    ) -> ExpertShard | None:
        """The shard of an expert-parallel ``model`` trained by ``optimizer`` (None without
        expert parallelism)."""
        if ep is None:
            return None
        keys = parallel.expert_parameters(model)
        ids = {id(p) for p in keys.values()}
        order = [p for g in optimizer.param_groups for p in g["params"]]
        opt_ids = tuple(i for i, p in enumerate(order) if id(p) in ids)
        return cls(tuple(keys), opt_ids, ep.rank, ep.size)


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


def _split(state: dict[str, Any], experts: ExpertShard) -> tuple[dict, dict]:
    """(state without the expert shard, the shard)."""
    keys, ids = set(experts.model_keys), set(experts.optimizer_ids)
    opt = state["optimizer"]
    shard = {
        "model": {k: v for k, v in state["model"].items() if k in keys},
        "optimizer": {i: s for i, s in opt["state"].items() if i in ids},
    }
    rest = dict(state)
    rest["model"] = {k: v for k, v in state["model"].items() if k not in keys}
    rest["optimizer"] = {**opt, "state": {i: s for i, s in opt["state"].items() if i not in ids}}
    return rest, shard


def save(
    run_dir: RunDir,
    state: dict[str, Any],
    *,
    rank: int = 0,
    world: int = 1,
    experts: ExpertShard | None = None,
) -> None:
    """Write ``state`` (every rank calls it): with ``world > 1`` every rank first writes its
    ``RANK_LOCAL`` entries (and, with ``experts``, its expert shard) to ``rank{r}.pt``, then
    rank 0 writes ``last.pt``, with barriers so no rank runs ahead of a half-written
    checkpoint. Raises OSError from the filesystem and what a failed barrier raises."""
    folder = run_dir.checkpoints_dir
    meta = {"step": state["step"], "world": world, "expert_parallel": 1}
    if experts is not None:
        state, shard = _split(state, experts)
        meta.update(
            expert_parallel=experts.ep_size,
            expert_keys=list(experts.model_keys),
            expert_optimizer_ids=list(experts.optimizer_ids),
        )
    if world > 1:
        local = {k: state[k] for k in RANK_LOCAL}
        local.update(step=state["step"], checkpoint=meta)
        if experts is not None:
            local["experts"] = shard
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder, *_rank_names(rank), local)
        dist.barrier()
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder, CKPT, PREVIOUS, {**state, "checkpoint": meta})
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
            local = _rank_file(folder, rank, state["step"])
            state.update({k: local[k] for k in RANK_LOCAL})
            state["rank_experts"] = local.get("experts")
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


def _rank_file(folder: Path, rank: int, step: int) -> dict[str, Any]:
    """Rank ``rank``'s file saved at ``step`` (``rank{r}.pt`` or the one before it)."""
    for name in _rank_names(rank):
        path = folder / name
        if not path.exists():
            continue
        try:
            local = torch.load(path, weights_only=False)
        except Exception:
            continue
        if local.get("step", step) == step:
            return local
    raise RunDirError(
        f"out: {folder} has no readable {_rank_names(rank)[0]} of step {step} for rank {rank}; "
        "start over with --no-resume"
    )


def _allowed(world: int, num_experts: int) -> list[int]:
    return [m for m in range(1, world + 1) if world % m == 0 and num_experts % m == 0]


def _block(t, lo: int, hi: int, n: int):
    """Rows [lo, hi) of an expert-dimension tensor with n rows; anything else as it is."""
    if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n:
        return t[lo:hi].clone()
    return t


def _cat(parts: list):
    """Shards -> the full tensor (expert dimension first); a scalar (Adam's step) as it is."""
    first = parts[0]
    if isinstance(first, torch.Tensor) and first.dim() >= 1:
        return torch.cat(parts)
    return first


def _reshard(folder: Path, state: dict, meta: dict, experts: ExpertShard | None, E: int) -> dict:
    """The expert entries for this rank: from the saved shards (``expert_parallel`` > 1 when
    saved) or from the full tensors in ``state`` (saved without expert parallelism)."""
    saved = meta["expert_parallel"]
    keys = meta.get("expert_keys") or (experts.model_keys if experts else [])
    ids = meta.get("expert_optimizer_ids") or (experts.optimizer_ids if experts else [])
    if saved > 1:  # ranks 0 .. saved - 1 hold EP ranks 0 .. saved - 1 of data-parallel replica 0
        shards = [_rank_file(folder, r, meta["step"])["experts"] for r in range(saved)]
        model = {k: torch.cat([s["model"][k] for s in shards]) for k in keys}
        opt = {
            i: {n: _cat([s["optimizer"][i][n] for s in shards]) for n in shards[0]["optimizer"][i]}
            for i in ids
            if i in shards[0]["optimizer"]
        }
    else:
        model = {k: state["model"][k] for k in keys}
        opt = {i: state["optimizer"]["state"][i] for i in ids if i in state["optimizer"]["state"]}
    size, r = (experts.ep_size, experts.ep_rank) if experts else (1, 0)
    lo, hi = r * E // size, (r + 1) * E // size
    return {
        "model": {k: _block(v, lo, hi, E) for k, v in model.items()},
        "optimizer": {i: {n: _block(v, lo, hi, E) for n, v in s.items()} for i, s in opt.items()},
    }


def place_experts(
    loaded: Loaded, *, device: torch.device, world: int = 1, experts: ExpertShard | None = None
) -> None:
    """Put this rank's experts into ``loaded.state`` (in place): its own saved shard, or the
    shard cut from the saved ones when the expert-parallel size changed (module docstring).

    Raises ValueError when the world size differs from the checkpoint's or the expert-parallel
    size is not one the checkpoint can be re-sharded to; RunDirError when a rank file is missing.
    """
    state = loaded.state
    meta = state.pop("checkpoint", None)
    rank_experts = state.pop("rank_experts", None)
    ep = experts.ep_size if experts is not None else 1
    E = int(state["config"]["moe"]["num_experts"])
    if meta is None:  # written before checkpoints recorded their layout: whole experts
        meta = {"step": state["step"], "world": world, "expert_parallel": 1}
    allowed = _allowed(meta["world"], E)
    if meta["world"] != world or ep not in allowed:
        raise ValueError(
            f"checkpoint: {loaded.path} was written by {meta['world']} ranks with expert "
            f"parallel {meta['expert_parallel']}; resume it on {meta['world']} ranks with "
            f"--expert-parallel one of {allowed} (got {world} ranks, expert parallel {ep})"
        )
    if meta["expert_parallel"] == 1 and ep == 1:
        return
    if meta["expert_parallel"] == ep:
        shard = rank_experts
    else:
        shard = _reshard(loaded.path.parent, state, meta, experts, E)
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    state["model"].update({k: move(v) for k, v in shard["model"].items()})
    opt = state["optimizer"]["state"]
    opt.update({i: {n: move(v) for n, v in s.items()} for i, s in shard["optimizer"].items()})


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
    "train.expert_parallel",  # experts are re-sharded on load (place_experts checks the size)
    "train.dist_timeout",
    "data.eval_batches",
    "data.eval_tokens",
    "data.eval_batch_size",
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
    "data.batch_domains",
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
    if "train.seed" in old:  # saved before data.data_seed: the training seed split the data
        old.setdefault("data.data_seed", old["train.seed"])
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
