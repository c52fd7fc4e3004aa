"""Shared fixtures of the testbed tests."""

from __future__ import annotations

import pytest
import torch

from moe_testbed.config import RunConfig


@pytest.fixture
def tiny_cfg():
    """A factory of seconds-long run configs on the synthetic domains: ``tiny_cfg(steps=4,
    lr=1e-3)`` sets train fields, ``moe={...}`` and ``model={...}`` set other sections."""
    torch.set_num_threads(1)  # tiny matmuls: more threads only contend

    def make(*, moe: dict | None = None, model: dict | None = None, **train_fields) -> RunConfig:
        cfg = RunConfig()
        sizes = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, d_ff_expert=32, seq_len=16)
        for key, value in {**sizes, **(model or {})}.items():
            setattr(cfg.model, key, value)
        for key, value in (moe or {}).items():
            setattr(cfg.moe, key, value)
        cfg.data.data_dir, cfg.data.eval_batches = "synthetic", 1
        t = cfg.train
        t.micro_batch_size, t.progress, t.probes = 4, False, False
        t.log_every, t.eval_every, t.ckpt_every = 1, 0, 2
        for key, value in train_fields.items():
            setattr(t, key, value)
        return cfg

    return make
