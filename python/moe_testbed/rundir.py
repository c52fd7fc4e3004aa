"""The run directory: everything one training run leaves behind, and the helpers that write it.

Layout::

    RUN_DIR/
      config.json              the resolved config (JSON object), written atomically
      metrics.jsonl            one JSON object per log step, appended
      counts/step_0001000.npz  routing counts of one evaluation, written atomically
      history.jsonl            one JSON object per start, resume, set-aside, config change
      checkpoints/             last.pt and previous.pt (moe_testbed.checkpoint)
      report/                  plots, report.html and summary.md (moe_testbed.report)
      .lock                    held by the run writing here (moe_testbed.runstart)
      .previous-<time>/        earlier runs moved aside by a fresh start (same layout)

``metrics.jsonl`` lines hold ``"step"`` (int, required), ``"tokens"`` and metric values under
the names of ``moe_testbed.logging`` (``"loss"``, ``"train/layer3/max_violation@global_batch"``,
``"val/all/specialization_score"``, ``"val/<domain>/loss"``, ...). Values are numbers (NaN/inf
written as JSON ``NaN``/``Infinity``, which Python's json reads back). Each append writes one
complete line, flushes and fsyncs. A crash can leave a truncated last line: readers ignore it,
and the next append first cuts the file back to its last complete line. A resumed run calls
``truncate_metrics(run_dir, after_step)`` to drop the lines logged after its checkpoint.

``counts/step_XXXXXXX.npz`` (step zero-padded to 7 digits) holds
``requested_LDE`` and ``kept_LDE`` (int64, L x D x E selections before / after capacity),
``weight_sum_LDE`` (float32, summed routing weights), optionally ``bias_LE`` (float32, the
aux-loss-free selection bias), ``domains`` (D domain names, unicode) and optionally ``groups``
(int64 D x G reference expert groups, padded with -1 if ragged); further numeric arrays may be
added by name. No pickled objects: files load with ``allow_pickle=False``.

Atomic writes go to a temporary file in the same directory, are fsynced and then moved over
the target with ``os.replace``, so a reader sees either the old or the new file, never half.

``history.jsonl`` records, one JSON object per line, every start, resume, set-aside and config
change of the run. Who may write a run directory, and how a run starts over in one (the lock,
``.previous-<time>/``), is :mod:`moe_testbed.runstart`'s.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RunDir",
    "atomic_write_bytes",
    "atomic_write_json",
    "fsync_dir",
    "truncate_metrics",
    "read_metrics",
    "last_values",
]

_COUNTS_RE = re.compile(r"^step_(\d+)\.npz$")
_REQUIRED_COUNTS = ("requested_LDE", "kept_LDE", "weight_sum_LDE")


def fsync_dir(path: Path) -> None:
    """Make a rename durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, os.replace).

    Creates missing parent directories. Returns the path. Raises OSError from the filesystem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch tensor
        return obj.detach().cpu().tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically (see ``atomic_write_bytes``).

    numpy scalars/arrays and torch tensors are converted to numbers/lists.
    Raises: TypeError for objects JSON cannot hold.
    """
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def _parse_lines(data: bytes, source: Path) -> list[dict[str, Any]]:
    records = []
    lines = data.split(b"\n")
    nonempty = [i for i, line in enumerate(lines) if line.strip()]
    last_index = nonempty[-1] if nonempty else -1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == last_index
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if last:  # the tail of a crashed append
                continue
            raise ValueError(f"{source}: line {i + 1} is not valid JSON: {err}") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{source}: line {i + 1} must be a JSON object with a 'step'")
        records.append(record)
    return records


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` in file order ([] if the file is missing).

    A truncated (unparseable) last line is ignored. Raises: ValueError on a corrupt line
    elsewhere or a record without ``"step"``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return _parse_lines(path.read_bytes(), path)


def truncate_metrics(run_dir: str | os.PathLike, after_step: int) -> int:
    """Drop every metrics record with ``step > after_step`` (and any truncated tail), atomically.

    Used by a resumed run before it logs again. Returns the number of records kept.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept = [r for r in _parse_lines(path.read_bytes(), path) if r["step"] <= after_step]
    text = "".join(json.dumps(r, default=_json_default) + "\n" for r in kept)
    atomic_write_bytes(path, text.encode("utf-8"))
    return len(kept)


def _groups_array(groups: Sequence[Sequence[int]]) -> np.ndarray:
    width = max((len(g) for g in groups), default=0)
    out = np.full((len(groups), width), -1, dtype=np.int64)
    for d, g in enumerate(groups):
        out[d, : len(g)] = list(g)
    return out


class RunDir:
    """One run directory (see the module docstring for the format).

    Nothing is created until something is written. Paths: ``path``, ``config_path``,
    ``metrics_path``, ``counts_dir``, ``checkpoints_dir``, ``report_dir``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.counts_dir = self.path / "counts"
        self.checkpoints_dir = self.path / "checkpoints"
        self.report_dir = self.path / "report"

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- history
    @property
    def history_path(self) -> Path:
        return self.path / "history.jsonl"

    def append_history(self, event: str, **fields: Any) -> None:
        """Append ``{"event": event, "time": ISO time, "pid": pid, **fields}`` to
        ``history.jsonl`` (flushed and fsynced). Raises TypeError for values JSON cannot hold."""
        record = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid()}
        record.update(fields)
        line = (json.dumps(record, default=_json_default) + "\n").encode("utf-8")
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.history_path, "ab+") as f:
            self._cut_partial_tail(f)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_history(self) -> list[dict[str, Any]]:
        """The records of ``history.jsonl`` ([] if missing; a truncated last line is ignored)."""
        if not self.history_path.exists():
            return []
        out = []
        for line in self.history_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    # -- config
    def write_config(self, config: dict[str, Any]) -> Path:
        """Write the resolved config atomically. Raises TypeError if not JSON-serializable."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        return atomic_write_json(self.config_path, config)

    def read_config(self) -> dict[str, Any]:
        """The config ({} when ``config.json`` does not exist). Raises ValueError naming the
        file when it is not a JSON object."""
        if not self.config_path.exists():
            return {}
        try:
            config = json.loads(self.config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.config_path}: not a valid JSON config ({err})") from None
        if not isinstance(config, dict):
            raise ValueError(
                f"{self.config_path}: expected a JSON object, got {type(config).__name__}"
            )
        return config

    # -- metrics
    def append_metrics(self, record: dict[str, Any], *, fsync: bool = True) -> None:
        """Append one record as a line of ``metrics.jsonl``.

        ``record`` needs an integer ``"step"``; values may be numbers, strings, numpy or 0-d
        torch values. A truncated last line left by a crash is cut off first.
        Raises: ValueError without a ``"step"``; TypeError for values JSON cannot hold.
        """
        if "step" not in record:
            raise ValueError(f"record must have a 'step', got keys {sorted(record)[:8]}")
        line = (json.dumps(record, default=_json_default) + "\n").encode("utf-8")
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "ab+") as f:
            self._cut_partial_tail(f)
            f.write(line)
            f.flush()
            if fsync:
                os.fsync(f.fileno())

    @staticmethod
    def _cut_partial_tail(f: Any) -> None:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        block = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                f.truncate(start + nl + 1)
                return
            pos = start
        f.truncate(0)

    def read_metrics(self) -> list[dict[str, Any]]:
        """See module-level ``read_metrics``."""
        return read_metrics(self.path)

    def truncate_metrics(self, after_step: int) -> int:
        """See module-level ``truncate_metrics``."""
        return truncate_metrics(self.path, after_step)

    # -- counts
    def counts_path(self, step: int) -> Path:
        return self.counts_dir / f"step_{int(step):07d}.npz"

    def write_counts(self, step: int, **arrays: Any) -> Path:
        """Write ``counts/step_XXXXXXX.npz`` atomically.

        Required: ``requested_LDE``, ``kept_LDE`` (cast to int64), ``weight_sum_LDE`` (cast to
        float32), all (L, D, E). Optional: ``bias_LE`` (float32, (L, E)), ``domains`` (D
        names), ``groups`` (D lists of expert ids), further numeric arrays. Tensors may live on
        any device.
        Raises: ValueError on a missing array or inconsistent shapes.
        """
        missing = [k for k in _REQUIRED_COUNTS if arrays.get(k) is None]
        if missing:
            raise ValueError(f"write_counts needs {list(_REQUIRED_COUNTS)}, missing {missing}")
        out: dict[str, np.ndarray] = {}
        for key, value in arrays.items():
            if value is None:
                continue
            if key == "domains":
                out[key] = np.asarray([str(d) for d in value], dtype=np.str_)
            elif key == "groups":
                out[key] = _groups_array(value)
            else:
                out[key] = _as_array(value)
        out["requested_LDE"] = out["requested_LDE"].astype(np.int64)
        out["kept_LDE"] = out["kept_LDE"].astype(np.int64)
        out["weight_sum_LDE"] = out["weight_sum_LDE"].astype(np.float32)
        shape = out["requested_LDE"].shape
        if len(shape) != 3:
            raise ValueError(f"requested_LDE must be 3-D (L, D, E), got shape {shape}")
        for key in ("kept_LDE", "weight_sum_LDE"):
            if out[key].shape != shape:
                raise ValueError(f"{key} must have shape {shape}, got {out[key].shape}")
        if "bias_LE" in out:
            out["bias_LE"] = out["bias_LE"].astype(np.float32)
            if out["bias_LE"].shape != (shape[0], shape[2]):
                raise ValueError(
                    f"bias_LE must have shape {(shape[0], shape[2])}, got {out['bias_LE'].shape}"
                )
        if "domains" in out and out["domains"].shape != (shape[1],):
            raise ValueError(f"domains must name D = {shape[1]} domains, got {len(out['domains'])}")
        if "groups" in out and out["groups"].shape[0] != shape[1]:
            raise ValueError(f"groups must hold D = {shape[1]} lists, got {out['groups'].shape[0]}")
        buf = io.BytesIO()
        np.savez_compressed(buf, **out)
        return atomic_write_bytes(self.counts_path(step), buf.getvalue())

    def drop_counts_after(self, step: int) -> list[int]:
        """Delete the counts files of steps after ``step`` (a resumed run redoes them);
        returns their steps."""
        dropped = [s for s in self.list_counts() if s > step]
        for s in dropped:
            self.counts_path(s).unlink()
        return dropped

    def list_counts(self) -> list[int]:
        """Steps with a counts file, ascending."""
        if not self.counts_dir.is_dir():
            return []
        steps = [_COUNTS_RE.match(p.name) for p in self.counts_dir.iterdir()]
        return sorted(int(m.group(1)) for m in steps if m)

    def load_counts(self, step: int) -> dict[str, Any]:
        """The arrays of one counts file.

        ``domains`` comes back as a list of str and ``groups`` as a list of lists of int (the
        -1 padding removed); other entries are numpy arrays.
        Raises: FileNotFoundError when no counts exist for ``step``; ValueError naming the file
        when it is corrupt.
        """
        path = self.counts_path(step)
        if not path.exists():
            raise FileNotFoundError(
                f"no counts for step {step}: {path} (have {self.list_counts()})"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                out: dict[str, Any] = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: unreadable counts file ({err})") from None
        missing = [k for k in _REQUIRED_COUNTS if k not in out]
        if missing:
            raise ValueError(f"{path}: counts file without {missing}")
        if "domains" in out:
            out["domains"] = [str(d) for d in out["domains"]]
        if "groups" in out:
            out["groups"] = [[int(e) for e in row if e >= 0] for row in out["groups"]]
        return out


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        t = value.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        return t.numpy()
    return np.asarray(value)


def last_values(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The last numeric value of every key across ``records`` (NaN included, as logged)."""
    out: dict[str, float] = {}
    for record in records:
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = float(value)
    return out
