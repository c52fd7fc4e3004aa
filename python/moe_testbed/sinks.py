"""Where logged records go: ``metrics.jsonl`` of the run directory always, and TensorBoard
event files with ``--tensorboard`` (the same scalars, plus the domain x expert routing heatmaps of
each evaluation as images). Names of the records are :mod:`moe_testbed.logging`'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_testbed.logging import name
from moe_testbed.rundir import RunDir

__all__ = ["MetricsLog", "TENSORBOARD_HINT", "TensorBoardSink", "require_tensorboard"]

TENSORBOARD_HINT = "pip install 'moe-testbed[tensorboard]'"


def require_tensorboard() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; raises ImportError with a one-line hint
    naming the extra when the ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            f"--tensorboard needs the tensorboard package: {TENSORBOARD_HINT}"
        ) from None
    return SummaryWriter


class TensorBoardSink:
    """Every numeric value of a record as a scalar (tag = metric name, global step = the
    record's step), and routing heatmaps as images. ``purge_step`` hides the events of an
    earlier attempt from that step on (a resumed run)."""

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None) -> None:
        writer = require_tensorboard()
        self.writer = writer(log_dir=os.fspath(log_dir), purge_step=purge_step)

    def scalars(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), global_step=step)

    def heatmaps(self, step: int, requested_LDE: np.ndarray, domains: Sequence[str]) -> None:
        from moe_testbed.plots import figure_rgb, heatmap_figure

        for layer, counts_DE in enumerate(np.asarray(requested_LDE)):
            if counts_DE.sum() == 0:
                continue
            image = figure_rgb(heatmap_figure(counts_DE, list(domains), layer, step))
            tag = name("routing_heatmap", split="val", layer=layer)
            self.writer.add_image(tag, image, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MetricsLog:
    """Where records go on the writing rank: ``metrics.jsonl``, counts files and, when asked,
    TensorBoard (``run_dir/tensorboard``). Every method does nothing with ``active=False``
    (ranks other than 0).

    Args: ``run_dir`` the run directory; ``tensorboard`` add the TensorBoard sink;
    ``resume_step`` the checkpoint step of a resumed run (later events are hidden).
    Raises ImportError (see :func:`require_tensorboard`) when TensorBoard is asked for and
    missing.
    """

    def __init__(
        self,
        run_dir: RunDir,
        *,
        active: bool = True,
        tensorboard: bool = False,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir, self.active = run_dir, active
        self.tensorboard: TensorBoardSink | None = None
        if active and tensorboard:
            purge = None if resume_step is None else resume_step + 1
            self.tensorboard = TensorBoardSink(run_dir.path / "tensorboard", purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (``"step"`` required) to every sink."""
        if not self.active:
            return
        self.run_dir.append_metrics(record)
        if self.tensorboard is not None:
            self.tensorboard.scalars(record)

    def write_counts(self, step: int, **arrays: Any) -> None:
        """The evaluation's counts file (``RunDir.write_counts``) and its heatmaps."""
        if not self.active:
            return
        self.run_dir.write_counts(step, **arrays)
        if self.tensorboard is not None:
            requested = np.asarray(arrays["requested_LDE"])
            domains = arrays.get("domains") or [f"domain {d}" for d in range(requested.shape[1])]
            self.tensorboard.heatmaps(step, requested, domains)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
