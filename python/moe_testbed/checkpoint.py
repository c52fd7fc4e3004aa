"""Checkpoint files of a run: everything the next optimizer step depends on, written atomically.

``RUN_DIR/checkpoints/last.pt`` holds the trainer's state (model, optimizer, scheduler, data
position, every RNG, the drained routing statistics, counters, the config). Under
``torch.distributed`` each rank also writes ``rank{r}.pt`` with what differs between ranks
(``RANK_LOCAL``: its data position and RNG states; under expert parallelism also its experts
and their optimizer state, which ``last.pt`` then leaves out); :func:`load` merges it back.

No partial checkpoint is ever taken for a complete one. Every file is written to a temporary
name and moved into place. With several ranks, each rank first writes ``rank{r}.next.pt``; once
all have (a barrier), rank 0 replaces ``last.pt``, which is the commit: each file carries the
step, and :func:`load` takes, for every rank, the one of ``rank{r}.pt`` / ``rank{r}.next.pt``
whose step is ``last.pt``'s. After a second barrier the ``.next`` files take the final name. A
crash before the commit leaves the previous checkpoint whole; a crash after it leaves the new
one whole.

Expert-parallel checkpoints resume on the same world size. The expert-parallel size may change
(experts are re-sharded on load: the shards of the saved EP ranks are concatenated and this
rank's block is cut out), to any size dividing both the world size and the number of experts;
anything else stops with a ValueError saying which sizes are allowed.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from moe_kernels import parallel
from moe_testbed.rundir import RunDir, atomic_write_bytes

__all__ = [
    "CKPT",
    "RANK_LOCAL",
    "ExpertShard",
    "exists",
    "load",
    "rng_state",
    "save",
    "set_rng_state",
]

CKPT = "last.pt"
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


def _write(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def exists(run_dir: RunDir) -> bool:
    """Whether ``run_dir`` has a checkpoint to resume from."""
    return (run_dir.checkpoints_dir / CKPT).exists()


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
    """Write ``state`` (every rank calls it; the module docstring says in which order).

    ``experts`` (expert parallelism): this rank's expert entries go to its rank file instead
    of ``last.pt``. Raises OSError from the filesystem and what a failed barrier raises.
    """
    ckpt = run_dir.checkpoints_dir
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
        if experts is not None:
            local["experts"] = shard
        _write(ckpt / f"rank{rank}.next.pt", {**local, "checkpoint": meta})
        dist.barrier()
    if rank == 0:
        _write(ckpt / CKPT, {**state, "checkpoint": meta})  # the commit
    if world > 1:
        dist.barrier()
        os.replace(ckpt / f"rank{rank}.next.pt", ckpt / f"rank{rank}.pt")


def _rank_file(ckpt: Path, rank: int, step: int | None) -> dict[str, Any]:
    """This rank's file of the committed checkpoint (``step``; None: a checkpoint written
    before files carried their step)."""
    names = (f"rank{rank}.pt", f"rank{rank}.next.pt")
    for name in names:
        if (ckpt / name).exists():
            local = torch.load(ckpt / name, weights_only=False)
            if step is None or local.get("checkpoint", {}).get("step") == step:
                return local
    raise FileNotFoundError(
        f"checkpoint: {ckpt} has no {' or '.join(names)} of step {step}, the step of {CKPT}; "
        "the rank files were removed or come from another run"
    )


def _allowed(world: int, num_experts: int) -> list[int]:
    return [m for m in range(1, world + 1) if world % m == 0 and num_experts % m == 0]


def _check(meta: dict, world: int, ep: int, num_experts: int, path: Path) -> None:
    allowed = _allowed(meta["world"], num_experts)
    if meta["world"] != world or ep not in allowed:
        raise ValueError(
            f"checkpoint: {path} was written by {meta['world']} ranks with expert parallel "
            f"{meta['expert_parallel']}; resume it on {meta['world']} ranks with "
            f"--expert-parallel one of {allowed} (got {world} ranks, expert parallel {ep})"
        )


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


def _reshard(ckpt: Path, state: dict, meta: dict, experts: ExpertShard | None, E: int) -> dict:
    """The expert entries for this rank: from the saved shards (``expert_parallel`` > 1 when
    saved) or from the full tensors in ``state`` (saved without expert parallelism)."""
    saved = meta["expert_parallel"]
    keys = meta.get("expert_keys") or (experts.model_keys if experts else [])
    ids = meta.get("expert_optimizer_ids") or (experts.optimizer_ids if experts else [])
    if saved > 1:  # ranks 0 .. saved - 1 hold EP ranks 0 .. saved - 1 of data-parallel replica 0
        shards = [_rank_file(ckpt, r, meta["step"])["experts"] for r in range(saved)]
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


def load(
    run_dir: RunDir,
    *,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    experts: ExpertShard | None = None,
) -> dict[str, Any]:
    """The saved state, with this rank's ``RANK_LOCAL`` entries when ``world > 1`` and this
    rank's experts (re-sharded when the expert-parallel size changed; module docstring).

    Raises FileNotFoundError when there is no checkpoint or a rank file of it is missing, and
    ValueError when the world size differs or the expert-parallel size is not allowed.
    """
    ckpt = run_dir.checkpoints_dir
    state = torch.load(ckpt / CKPT, map_location=device, weights_only=False)
    meta = state.pop("checkpoint", None)
    ep = experts.ep_size if experts is not None else 1
    E = int(state["config"]["moe"]["num_experts"])
    if meta is None:  # written before checkpoints recorded their layout: whole experts
        meta = {"step": None, "world": world, "expert_parallel": 1}
    _check(meta, world, ep, E, ckpt / CKPT)
    if world > 1:
        local = _rank_file(ckpt, rank, meta["step"])
        state.update({k: local[k] for k in RANK_LOCAL})
    if meta["expert_parallel"] > 1 or ep > 1:
        if meta["expert_parallel"] == ep:
            shard = local["experts"]
        else:
            shard = _reshard(ckpt, state, meta, experts, E)
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        state["model"].update({k: move(v) for k, v in shard["model"].items()})
        opt = state["optimizer"]["state"]
        opt.update({i: {n: move(v) for n, v in s.items()} for i, s in shard["optimizer"].items()})
    return state
