"""What a training run sets up around the model: the process group, the device, autocast,
seeds, the learning-rate schedule, the optimizer, and the window of routing statistics read
from the MoE layers between log steps (``moe_testbed.train`` uses them).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_kernels import stats
from moe_testbed.config import RunConfig


def init_dist(timeout_s: float) -> tuple[int, int]:
    """(rank, world) -- initialises the process group when launched by torchrun, with
    collectives that give up after ``timeout_s`` seconds."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def pick_device(cfg: RunConfig, rank: int) -> torch.device:
    if cfg.train.device != "auto":
        return torch.device(cfg.train.device)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_for(cfg: RunConfig, device: torch.device):
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # same init on every rank; data differs by rank
    np.random.seed(seed)
    random.seed(seed)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup, cosine decay."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    # Weight decay on matrices only: norms and biases are not shrunk toward zero.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
    )


class StatsWindow:
    """Routing counts read from the MoE layers, summed on the host between log steps.

    ``drain`` moves the device accumulators here (reset); the window is part of the checkpoint
    so a resumed run logs the same numbers.
    """

    KEYS = (
        "requested_LDE",
        "kept_LDE",
        "weight_sum_LDE",
        "entropy_sum_L",
        "max_prob_sum_L",
        "tokens_L",
    )

    def __init__(self, model: torch.nn.Module, enabled: bool, all_reduce: bool) -> None:
        self.model, self.enabled, self.all_reduce = model, enabled, all_reduce
        self.sums: dict[str, np.ndarray] = {}
        self.bias_LE: np.ndarray | None = None

    def read(self, all_reduce: bool | None = None) -> dict[str, np.ndarray]:
        reduce = self.all_reduce if all_reduce is None else all_reduce
        return stats.read(self.model, reset=True, all_reduce=reduce)

    def drain(self) -> None:
        if self.enabled:
            self.add(self.read())

    def add(self, r: dict[str, Any]) -> None:
        for k in self.KEYS:
            v = np.asarray(r[k], dtype=np.float64 if "sum" in k else np.int64)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        if r.get("bias_LE") is not None:
            self.bias_LE = np.asarray(r["bias_LE"], dtype=np.float32)

    def take(self) -> dict[str, np.ndarray]:
        out, self.sums = self.sums, {}
        return out
