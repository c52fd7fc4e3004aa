"""``moe-testbed demo``: four routers on the built-in sample, tiny preset, and their comparison.

Runs, all with E=8 experts, top-2, on four clearly different domains of the shipped sample
(English literature, German, Chinese, Python code), so the reference router gives each domain
its own group of E/D = 2 experts:

==================  ==========================================================================
reference           oracle: the domain picks the expert group (specialization upper bound)
learned_global      learned router, Switch aux loss over the global batch
learned_micro       learned router, Switch aux loss per micro-batch (the common default)
random              random linear router re-drawn every step (not content-free: a random
                    projection of hidden states that differ by domain depends on the domain;
                    its metrics are means over draws, and ``evaluation.json`` compares every run
                    with such routers as the representation floor; the hash router is the
                    content-free floor)
==================  ==========================================================================

The step count is tuned so that all four runs and the report take under ten minutes on two CPU
cores (measured with 240 steps: about 2.7 min of wall time per run on a two-core machine shared
with other jobs, 1.3 min of CPU time; 200 steps leaves headroom).
"""

from __future__ import annotations

import time
from pathlib import Path

from moe_testbed.config import RunConfig, get_preset, validate

DEFAULT_STEPS = 200
DOMAINS = "en_lit,de,zh,code_py"

RUNS: dict[str, dict[str, str]] = {
    "reference": {"router": "reference", "balance": "aux", "scope": "global_batch"},
    "learned_global": {"router": "learned", "balance": "aux", "scope": "global_batch"},
    "learned_micro": {"router": "learned", "balance": "aux", "scope": "micro_batch"},
    "random": {"router": "random", "balance": "none", "scope": "global_batch"},
}


def demo_config(name: str, steps: int, data_dir: str | None = None) -> RunConfig:
    """The config of one demo run: tiny preset, 4 domains, grad accumulation 2."""
    cfg = RunConfig(preset="tiny", model=get_preset("tiny"))
    for key, value in RUNS[name].items():
        setattr(cfg.moe, key, value)
    cfg.data.data_dir = data_dir
    cfg.data.domains = None if data_dir else DOMAINS
    t = cfg.train
    t.steps, t.micro_batch_size, t.grad_accum = steps, 8, 2
    t.warmup_steps = max(1, steps // 10)
    t.log_every = max(1, steps // 24)
    t.eval_every = t.ckpt_every = max(1, steps // 4)
    validate(cfg)
    return cfg


def run_demo(
    out: str | Path = "runs/demo", steps: int | None = None, data_dir: str | None = None
) -> list[Path]:
    """Train the four runs (each resumes if already there) and write ``OUT/compare``.

    ``steps``: optimizer steps per run (None = ``DEFAULT_STEPS``). Raises ConfigError for
    ``steps < 1`` before anything trains.
    """
    from moe_testbed.report import compare, make_report
    from moe_testbed.train import train

    out = Path(out)
    steps = DEFAULT_STEPS if steps is None else steps  # 0 is refused by the config, not replaced
    configs = {name: demo_config(name, steps, data_dir) for name in RUNS}  # all checked first
    tic = time.perf_counter()
    for name in RUNS:
        print(f"== demo run {name} ({steps} steps)", flush=True)
        train(configs[name], out / name)
        make_report(out / name)
    paths = compare([out / name for name in RUNS], out / "compare")
    print(f"== demo finished in {time.perf_counter() - tic:.0f} s; report: {out / 'compare'}")
    md = out / "compare" / "compare.md"
    if md.exists():
        print(md.read_text())
    return paths
