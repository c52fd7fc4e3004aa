"""Checkpoint files of a run: everything the next optimizer step depends on, written atomically.

``RUN_DIR/checkpoints/last.pt`` holds the trainer's state (model, optimizer, scheduler, data
position, every RNG, the drained routing statistics, counters, the config). Under
``torch.distributed`` each rank also writes ``rank{r}.pt`` with what differs between ranks
(``RANK_LOCAL``: its data position and RNG states); :func:`load` merges it back. Files are
written to a temporary name and moved into place, so a crash leaves the previous checkpoint.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_testbed.rundir import RunDir, atomic_write_bytes

__all__ = ["CKPT", "RANK_LOCAL", "exists", "load", "rng_state", "save", "set_rng_state"]

CKPT = "last.pt"
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


def _write(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def exists(run_dir: RunDir) -> bool:
    """Whether ``run_dir`` has a checkpoint to resume from."""
    return (run_dir.checkpoints_dir / CKPT).exists()


def save(run_dir: RunDir, state: dict[str, Any], *, rank: int = 0, world: int = 1) -> None:
    """Write ``state`` (every rank calls it): rank 0 writes ``last.pt``; with ``world > 1``
    every rank first writes its ``RANK_LOCAL`` entries to ``rank{r}.pt``, with barriers so no
    rank runs ahead of a half-written checkpoint."""
    if world > 1:
        local = {k: state[k] for k in RANK_LOCAL}
        _write(run_dir.checkpoints_dir / f"rank{rank}.pt", local)
        dist.barrier()
    if rank == 0:
        _write(run_dir.checkpoints_dir / CKPT, state)
    if world > 1:
        dist.barrier()


def load(run_dir: RunDir, *, device: torch.device, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """The saved state, with this rank's ``RANK_LOCAL`` entries when ``world > 1``.

    Raises FileNotFoundError when there is no checkpoint.
    """
    state = torch.load(run_dir.checkpoints_dir / CKPT, map_location=device, weights_only=False)
    if world > 1:
        state.update(torch.load(run_dir.checkpoints_dir / f"rank{rank}.pt", weights_only=False))
    return state
