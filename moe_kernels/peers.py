"""Naming the peers of a failed collective: every rank's host and pid, gathered while all are
up, so that a collective that fails says which rank exited (or that none did and one stalled)
instead of a bare transport error. Used by ``moe_kernels.parallel`` and the testbed trainer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass

import torch.distributed as dist

# How long a failed collective waits for a peer that dropped its connections to be reaped:
# the kernel closes a killed process's sockets just before the process is marked exited.
_EXIT_GRACE_S = 2.0


class PeerFailure(RuntimeError):
    """A collective failed: a peer rank exited, raised or stalled. The message names the ranks
    whose process has exited, or says that none has."""


def _exited(pid: int) -> bool:
    """Whether process ``pid`` (on this host) has exited (gone, or a zombie not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class Peers:
    """The global rank, host and pid of every rank of a process group, gathered while all are
    up (:meth:`gather` is a collective), to name the failed ones when a collective fails."""

    ranks: tuple[int, ...]
    hosts: tuple[str, ...]
    pids: tuple[int, ...]

    @classmethod
    def gather(cls, group: dist.ProcessGroup | None = None) -> Peers:
        """Every rank of ``group`` (default: the world) must call it."""
        me = (dist.get_rank(), socket.gethostname(), os.getpid())
        table: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(table, me, group=group)
        ranks, hosts, pids = zip(*table)
        return cls(tuple(ranks), tuple(hosts), tuple(pids))

    def exited(self) -> list[int]:
        """Global ranks on this host whose process has exited."""
        host = socket.gethostname()
        return [r for r, h, p in zip(self.ranks, self.hosts, self.pids) if h == host and _exited(p)]

    def explain(self, what: str, err: BaseException) -> str:
        """The message of a failed collective ``what``: which peers exited, or that none did."""
        deadline = time.monotonic() + _EXIT_GRACE_S
        gone = self.exited()
        while not gone and time.monotonic() < deadline:
            time.sleep(0.05)
            gone = self.exited()
        head = f"rank {dist.get_rank()}: {what} over ranks {list(self.ranks)} failed"
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if gone:
            who = ", ".join(f"rank {r} (pid {self.pids[self.ranks.index(r)]})" for r in gone)
            return f"{head}: {who} exited; see that rank's log. ({cause})"
        remote = sorted({h for h in self.hosts if h != socket.gethostname()})
        where = f" (ranks on {', '.join(remote)} not checked)" if remote else ""
        return (
            f"{head}: no peer process on this host has exited{where}; a peer raised without "
            f"exiting, or stalled past the collective timeout. ({cause})"
        )

    @contextlib.contextmanager
    def guard(self, what: str, *, collective: bool = True):
        """Turn a failure of the collectives inside into a :class:`PeerFailure` naming peers.

        ``collective=False`` (a block that also runs local code): only a ``DistError`` or a
        RuntimeError while some peer has exited is turned; others propagate unchanged."""
        try:
            yield
        except PeerFailure:
            raise
        except RuntimeError as e:  # gloo raises plain RuntimeErrors, NCCL DistBackendErrors
            if collective or isinstance(e, dist.DistError) or self.exited():
                raise PeerFailure(self.explain(what, e)) from e
            raise
