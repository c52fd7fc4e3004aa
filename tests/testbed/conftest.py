"""Shared fixtures of the testbed tests: a factory of seconds-long synthetic run configs, and
for the analysis tests one tiny trained run on the shipped sample and its Hugging Face export,
built once per session (a few seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

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
        cfg.data.data_dir, cfg.data.eval_tokens, cfg.data.eval_batch_size = "synthetic", 64, 4
        t = cfg.train
        t.micro_batch_size, t.progress, t.probes = 4, False, False
        t.log_every, t.eval_every, t.ckpt_every = 1, 0, 2
        for key, value in train_fields.items():
            setattr(t, key, value)
        return cfg

    return make


SAMPLE_DOMAINS = "de,code_py,legal"
# Tiny on purpose: the tests check plumbing and exactness, not what the model learns. Two
# evaluation batches of 4 sequences of 32 tokens: 256 validation tokens per domain.
RUN = {
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff_expert": 32, "seq_len": 32},
    "moe": {"num_experts": 4, "top_k": 2},
    "data": {"domains": SAMPLE_DOMAINS, "eval_tokens": 256, "eval_batch_size": 4},
    "train": {
        "steps": 4,
        "micro_batch_size": 4,
        "eval_every": 4,
        "log_every": 2,
        "ckpt_every": 4,
        "progress": False,
        "warmup_steps": 1,
    },
}
VAL_TOKENS = 2 * 4 * 32


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory) -> Path:
    """A 4-step run on three sample domains (checkpoint, counts, metrics)."""
    from moe_testbed.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    try:
        train(RunConfig.from_dict(RUN), out)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="session")
def sample_export(sample_run, tmp_path_factory) -> Path:
    """``sample_run`` exported as a Hugging Face model directory (with its tokenizer)."""
    pytest.importorskip("transformers")
    from moe_testbed.export import export_run

    return export_run(sample_run, tmp_path_factory.mktemp("export") / "hf")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: more intra-op threads only contend (and spin on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
