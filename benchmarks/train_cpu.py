"""Training-step time of a preset with routing statistics on vs off, and against the dense
baseline of equal active parameters (the MoE FFNs replaced by SwiGLU FFNs of width k*F), in
tokens/s.

    python -m benchmarks.train_cpu [--preset tiny] [--steps 30] [--repeats 5] [--compile]

One step = forward + cross-entropy + aux losses, backward, AdamW step, update_routers; with
statistics on, the MoE layers record counts every forward and the host reads them every 10
steps as the trainer does. On and off alternate in blocks of ``--steps`` steps, ``--repeats``
times, and the medians are compared, so drifting machine load hits both alike; the dense baseline
runs in the same alternation. The MoE/dense ratio is the share of the dense model's throughput
the MoE model reaches at the same active parameters (1.0 = routing costs nothing). CPU timings use
the host clock (synchronous execution); on CUDA the clock is read after a device synchronize.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from moe_kernels import aux_losses, stats, update_routers
from moe_testbed.config import default_moe
from moe_testbed.model import MoETransformer
from moe_testbed.presets import get_preset

READ_EVERY = 10  # the trainer's default log interval


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(model, opt, batches, device, with_stats: bool) -> float:
    """Seconds per step over ``batches``; ``with_stats`` must be False for a dense model."""
    if with_stats:
        stats.enable(model, num_labels=8)
    else:
        stats.disable(model)
    _sync(device)
    tic = time.perf_counter()
    for i, (tokens, labels) in enumerate(batches):
        logits = model(tokens[:, :-1], labels[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].reshape(-1)) + aux_losses(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_routers(model)
        if with_stats and (i + 1) % READ_EVERY == 0:
            stats.read(model, reset=True)
    _sync(device)
    return (time.perf_counter() - tic) / len(batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile N steps of each model (torch.profiler) and print where the MoE "
        "model's extra time goes: self CPU time per op, MoE minus dense",
    )
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    m = get_preset(args.preset)
    m.vocab_size = args.vocab
    model = MoETransformer(m, default_moe()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dense = MoETransformer(dataclasses.replace(m, dense="equal_active"), default_moe()).to(device)
    dense_opt = torch.optim.AdamW(dense.parameters(), lr=1e-3)
    if args.compile:
        model, dense = torch.compile(model), torch.compile(dense)
    batches = [
        (
            torch.randint(0, args.vocab, (args.batch, m.seq_len + 1), device=device),
            torch.randint(0, 8, (args.batch, m.seq_len + 1), device=device),
        )
        for _ in range(args.steps)
    ]
    time_block(model, opt, batches[:3], device, True)  # warm-up (and compilation)
    time_block(dense, dense_opt, batches[:3], device, False)
    on, off, den = [], [], []
    for _ in range(args.repeats):
        off.append(time_block(model, opt, batches, device, False))
        on.append(time_block(model, opt, batches, device, True))
        den.append(time_block(dense, dense_opt, batches, device, False))
    t_on, t_off, t_den = statistics.median(on), statistics.median(off), statistics.median(den)
    tokens = args.batch * m.seq_len
    n, nd = _counts(model), _counts(dense)
    print(
        f"preset {args.preset}: {n['total'] / 1e6:.2f}M params ({n['active'] / 1e6:.2f}M active), "
        f"dense equal_active {nd['total'] / 1e6:.2f}M; {tokens} tokens/step, device {device}, "
        f"threads {torch.get_num_threads()}, compile {args.compile}"
    )
    print(f"{'model':24s} {'ms/step':>9s} {'tokens/s':>10s}")
    print(f"{'MoE, statistics off':24s} {t_off * 1e3:9.1f} {tokens / t_off:10,.0f}")
    print(f"{'MoE, statistics on':24s} {t_on * 1e3:9.1f} {tokens / t_on:10,.0f}")
    print(f"{'dense equal_active':24s} {t_den * 1e3:9.1f} {tokens / t_den:10,.0f}")
    print(f"MoE (statistics on) / dense tokens/s: {t_den / t_on:.2f}")
    print(
        f"statistics overhead: {100 * (t_on / t_off - 1):+.2f}% (median of {args.repeats} "
        f"blocks of {args.steps} steps; spread off {min(off) * 1e3:.1f}-{max(off) * 1e3:.1f} ms, "
        f"on {min(on) * 1e3:.1f}-{max(on) * 1e3:.1f} ms)"
    )
    if args.profile:
        moe_ops = profile_ops(model, opt, batches[: args.profile], device, True)
        dense_ops = profile_ops(dense, dense_opt, batches[: args.profile], device, False)
        print_profile(moe_ops, dense_ops, args.profile)


def profile_ops(model, opt, batches, device, with_stats: bool) -> dict[str, float]:
    """Self CPU milliseconds per step by op name over ``batches``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        time_block(model, opt, batches, device, with_stats)
    return {e.key: e.self_cpu_time_total / 1e3 / len(batches) for e in prof.key_averages()}


def print_profile(moe: dict[str, float], dense: dict[str, float], steps: int, top: int = 15):
    """The ops whose self time differs most between the MoE and the dense model, per step."""
    names = set(moe) | set(dense)
    diff = sorted(names, key=lambda k: -(moe.get(k, 0.0) - dense.get(k, 0.0)))
    total_m, total_d = sum(moe.values()), sum(dense.values())
    print(
        f"profile ({steps} steps, statistics on): self CPU time per step, MoE {total_m:.1f} ms, "
        f"dense {total_d:.1f} ms (profiler overhead included)"
    )
    largest = sorted(names, key=lambda k: -max(moe.get(k, 0.0), dense.get(k, 0.0)))
    for keys, title in ((diff, ""), (largest, "   (largest in either)")):
        print(f"{'op':48s} {'MoE ms':>8s} {'dense ms':>9s} {'extra':>8s}{title}")
        for k in keys[:top]:
            m, d = moe.get(k, 0.0), dense.get(k, 0.0)
            print(f"{k[:48]:48s} {m:8.2f} {d:9.2f} {m - d:+8.2f}")
    ours = sum(v for k, v in moe.items() if k.startswith("moe_kernels::"))
    only = {k: v for k, v in moe.items() if k not in dense}
    print(
        f"all moe_kernels:: ops (self time): {ours:.2f} ms per step; ops the dense model does "
        f"not run at all (routing, dispatch, combine, their backward and wrappers): "
        f"{sum(only.values()):.2f} ms per step in {len(only)} op kinds"
    )


def _counts(model) -> dict:
    return getattr(model, "_orig_mod", model).num_params()


if __name__ == "__main__":
    main()
