"""Who may write a run directory, and how a run starts in one.

* One writer at a time: a training run holds an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock``
  for its whole life (:func:`lock`); the operating system drops it when the process ends,
  however it ends, so a crash never leaves the directory locked. A second writer is refused at
  once, and the message names the holder's pid (written into the lock file).
* Clean starts: temporary files of atomic writes that a killed writer left behind are removed
  (:func:`remove_stale_temp`). A run that starts over (``--no-resume``, or no checkpoint to
  resume from) in a directory holding an earlier run first moves every entry of it into
  ``RUN_DIR/.previous-<time>/`` (:func:`set_aside`): nothing is deleted, and nothing of the old
  run can be mistaken for the new one. A journal file (``.set-aside``, naming the target) makes
  the move all-or-nothing across a crash: the next start finishes it before anything else.
  A non-empty directory that holds no run is refused rather than emptied.

Every function here expects the caller to hold the lock, except :func:`lock` itself.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from moe_testbed.rundir import RunDir, atomic_write_bytes, fsync_dir

__all__ = [
    "LOCK",
    "PREVIOUS_PREFIX",
    "RunDirError",
    "RunLock",
    "entries",
    "finish_set_aside",
    "lock",
    "previous_runs",
    "remove_stale_temp",
    "set_aside",
]

LOCK = ".lock"
SET_ASIDE_JOURNAL = ".set-aside"
PREVIOUS_PREFIX = ".previous-"
# Entries that mark a directory as a run directory: only such a directory is moved aside.
_RUN_MARKERS = ("config.json", "metrics.jsonl", "history.jsonl", "checkpoints", "counts")


class RunDirError(RuntimeError):
    """A run directory cannot be used as asked (held by another run, a file, not a run
    directory, no readable checkpoint); the message names the directory and what to do."""


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``, held until :meth:`release` or process end."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def lock(run_dir: RunDir) -> RunLock:
    """Take ``run_dir`` (created if missing) for this process: an exclusive non-blocking
    ``flock`` on ``.lock``, which then holds this process's pid.

    Raises: RunDirError at once when another process holds it (naming its pid) or when the
    path exists and is not a directory.
    """
    if run_dir.path.exists() and not run_dir.path.is_dir():
        raise RunDirError(f"out: expected a run directory, got the file {run_dir.path}")
    run_dir.path.mkdir(parents=True, exist_ok=True)
    path = run_dir.path / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(
            f"out: {run_dir.path} is in use by another run (pid {_holder(path)}); wait for it "
            "to finish or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return RunLock(path, fd)


def _holder(path: Path) -> str:
    for _ in range(50):  # the holder writes its pid right after it takes the lock
        text = path.read_text().strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


def remove_stale_temp(run_dir: RunDir) -> list[Path]:
    """Delete the temporary files of atomic writes (``.NAME.*.tmp`` in the run directory,
    ``checkpoints/`` and ``counts/``) that a killed writer left behind. Returns them."""
    removed = []
    for folder in (run_dir.path, run_dir.checkpoints_dir, run_dir.counts_dir):
        if folder.is_dir():
            for p in sorted(folder.glob(".*.tmp")):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def entries(run_dir: RunDir) -> list[Path]:
    """What runs left in ``run_dir``: every entry but the lock, the journal and the earlier
    runs already set aside."""
    if not run_dir.path.is_dir():
        return []
    return sorted(
        p
        for p in run_dir.path.iterdir()
        if p.name not in (LOCK, SET_ASIDE_JOURNAL) and not p.name.startswith(PREVIOUS_PREFIX)
    )


def set_aside(run_dir: RunDir) -> Path | None:
    """Move every entry (:func:`entries`) into a new ``.previous-<time>/``, so that a new run
    starts in an empty directory and the earlier one stays readable there.

    Returns that folder, or None when there was nothing to move. Raises RunDirError when the
    directory holds entries but no run (it is left as it is then).
    """
    finish_set_aside(run_dir)
    found = entries(run_dir)
    if not found:
        return None
    names = sorted(p.name for p in found)
    if not set(names) & set(_RUN_MARKERS):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise RunDirError(
            f"out: {run_dir.path} is not empty and holds no run (found {shown}); choose a new "
            "or empty directory"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.path / f"{PREVIOUS_PREFIX}{stamp}"
    n = 1
    while target.exists():
        target = run_dir.path / f"{PREVIOUS_PREFIX}{stamp}-{n}"
        n += 1
    # From here on the move is decided: a crash part-way is completed by the next start.
    atomic_write_bytes(run_dir.path / SET_ASIDE_JOURNAL, target.name.encode())
    finish_set_aside(run_dir)
    return target


def finish_set_aside(run_dir: RunDir) -> Path | None:
    """Complete a set-aside that the journal says was decided; returns its folder (None when
    there is no journal)."""
    journal = run_dir.path / SET_ASIDE_JOURNAL
    if not journal.exists():
        return None
    name = journal.read_text().strip()
    if not name.startswith(PREVIOUS_PREFIX) or os.sep in name:
        raise RunDirError(
            f"{journal}: expected the name of a {PREVIOUS_PREFIX}* folder, got {name!r}"
        )
    target = run_dir.path / name
    target.mkdir(exist_ok=True)
    for p in entries(run_dir):
        os.replace(p, target / p.name)
    fsync_dir(run_dir.path)
    journal.unlink()
    fsync_dir(run_dir.path)
    return target


def previous_runs(run_dir: RunDir) -> list[Path]:
    """Folders of earlier runs set aside in ``run_dir``, oldest first."""
    if not run_dir.path.is_dir():
        return []
    return sorted(p for p in run_dir.path.iterdir() if p.name.startswith(PREVIOUS_PREFIX))
