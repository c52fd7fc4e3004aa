"""Expert-parallel training under torchrun (gloo, CPU): EP x DP against one process, a killed
rank, resume, re-sharded checkpoints and the checkpoint commit rule.

The kill-and-resume run uses 2 ranks: there a resumed run is bit-identical to an uninterrupted
one. With 4 ranks DDP's gradient all-reduce is not: DDP re-orders its bucket after the first
step of every process, and gloo's 4-rank all-reduce sums each element in an order that depends
on its position in the bucket, so the step after a resume differs in the last bits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_testbed import checkpoint
from moe_testbed.cli import main as cli_main
from moe_testbed.rundir import RunDir
from moe_testbed.runstart import RunDirError

# A few-second model on synthetic domains. Capacity and micro-batch scope are per micro-batch,
# so 4 ranks x 1 micro-batch and 1 rank x 4 micro-batches see the same batches and compute
# the same step (the synthetic stream gives rank r of W its batch n * W + r).
ARGS = [
    "--data-dir", "synthetic", "--vocab-size", "256", "--d-model", "32", "--n-layers", "2",
    "--n-heads", "2", "--d-ff-expert", "32", "--seq-len", "16", "--micro-batch-size", "4",
    "--eval-tokens", "64", "--eval-batch-size", "4", "--no-progress",
    "--steps", "12", "--log-every", "2",
    "--eval-every", "6", "--ckpt-every", "4", "--scope", "micro_batch",
    "--capacity-factor", "1.25", "--dist-timeout", "60",
]  # fmt: skip
WORLD, EP = 4, 2  # the EP x DP run
_CWD = "/"  # subprocesses import the installed (or editable) packages, not the source tree


def _env() -> dict[str, str]:
    import moe_kernels
    import moe_testbed

    env = dict(os.environ)
    paths = {str(Path(m.__file__).resolve().parents[1]) for m in (moe_kernels, moe_testbed)}
    env["PYTHONPATH"] = os.pathsep.join([*sorted(paths), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(out: Path, *extra: str, world: int = WORLD) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={world}", "-m", "moe_testbed", "train", *ARGS,
        "--expert-parallel", str(EP), "--out", str(out), *extra,
    ]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=_env(), cwd=_CWD, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "address already in use" in res.stderr.lower():
        # --standalone picks a free port and binds it later; another process can take it.
        res = subprocess.run(cmd, env=_env(), cwd=_CWD, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory) -> Path:
    """An uninterrupted EP = 2 x DP = 2 run on 4 ranks."""
    out = tmp_path_factory.mktemp("ep") / "run"
    _run(_torchrun(out))
    return out


def test_ep_x_dp_matches_one_process(ep_run, tmp_path):
    torch.set_num_threads(1)
    single = tmp_path / "single"
    assert cli_main(["train", *ARGS, "--grad-accum", str(WORLD), "--out", str(single)]) == 0
    a, b = _records(ep_run), _records(single)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    train = [(x, y) for x, y in zip(a, b) if "loss" in x]
    assert [x["tokens"] for x, _ in train] == [y["tokens"] for _, y in train]
    for key in ("loss", "aux_loss", "grad_norm", "lr"):
        got, want = np.array([[x[key], y[key]] for x, y in train]).T
        print(key, "max rel err", np.max(np.abs(got - want) / np.abs(want)))
        np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=key)
    val = [(x["val/loss"], y["val/loss"]) for x, y in zip(a, b) if "val/loss" in x]
    assert len(val) == 2
    np.testing.assert_allclose(*np.array(val).T, rtol=1e-4)
    # Routing counts of the evaluations: every rank routed the same validation tokens.
    for step in (6, 12):
        with np.load(ep_run / f"counts/step_{step:07d}.npz") as x:
            with np.load(single / f"counts/step_{step:07d}.npz") as y:
                assert x["requested_LDE"].sum() == y["requested_LDE"].sum()
    assert (ep_run / "checkpoints" / "rank3.pt").exists()
    assert not list((ep_run / "checkpoints").glob("*.next.pt"))


def _worker_pid(agent: int, rank: int) -> int:
    """The pid of the torchrun worker of ``rank`` (a child of the agent with RANK=rank)."""
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == agent and f"RANK={rank}".encode() in env:
            return int(d)
    raise AssertionError(f"no worker of rank {rank} under torchrun pid {agent}")


def test_killed_rank_stops_the_run_and_resume_reproduces_it(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run(_torchrun(ref, world=2))  # EP = 2 on 2 ranks, uninterrupted
    proc = subprocess.Popen(
        _torchrun(killed, world=2), env=_env(), cwd=_CWD, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ckpt, deadline = killed / "checkpoints" / "last.pt", time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(_worker_pid(proc.pid, 1), signal.SIGKILL)
    tic = time.time()
    _, err = proc.communicate(timeout=120)
    # Every rank is gone well within the 60 s collective timeout, and the failed rank is named
    # (by the surviving ranks' PeerFailure, and by torchrun's summary).
    assert proc.returncode != 0 and time.time() - tic < 60
    assert "rank 1 (pid" in err or "rank      : 1" in err, err[-3000:]
    done = [r["step"] for r in _records(killed)] if (killed / "metrics.jsonl").exists() else []
    assert not done or max(done) < 12
    shutil.copytree(killed, tmp_path / "reshard")  # for the EP-size change below

    _run(_torchrun(killed, world=2))
    assert _records(ref) == _records(killed)  # every loss and metric value, bit for bit
    for step in (6, 12):
        name = f"counts/step_{step:07d}.npz"
        with np.load(ref / name) as x, np.load(killed / name) as y:
            for key in x.files:
                np.testing.assert_array_equal(x[key], y[key])

    # The same checkpoint resumed without expert parallelism (the experts gathered on load).
    _run([*_torchrun(tmp_path / "reshard", world=2), "--expert-parallel", "1"])
    a, b = _records(ref), _records(tmp_path / "reshard")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    got, want = np.array([[x["loss"], y["loss"]] for x, y in zip(a, b) if "loss" in x]).T
    np.testing.assert_allclose(got, want, rtol=1e-4)


# ---- checkpoint files, without processes -------------------------------------------------------


def test_checkpoint_reshards_experts_and_names_allowed_sizes(ep_run):
    run = RunDir(ep_run)
    meta = torch.load(ep_run / "checkpoints" / checkpoint.CKPT, weights_only=False)["checkpoint"]
    assert (meta["world"], meta["expert_parallel"]) == (WORLD, EP)
    keys, ids = tuple(meta["expert_keys"]), tuple(meta["expert_optimizer_ids"])
    assert keys and ids
    shard = lambda r, size: checkpoint.ExpertShard(keys, ids, r, size)  # noqa: E731
    cpu = torch.device("cpu")

    def load(run, *, device, rank, world, experts):
        loaded = checkpoint.load(run, device=device, rank=rank, world=world)
        checkpoint.place_experts(loaded, device=device, world=world, experts=experts)
        return loaded.state

    saved = [load(run, device=cpu, rank=r, world=WORLD, experts=shard(r, EP)) for r in (0, 1)]
    full = load(run, device=cpu, rank=0, world=WORLD, experts=None)
    quarter = load(run, device=cpu, rank=3, world=WORLD, experts=shard(3, 4))
    for k in keys:
        whole = torch.cat([s["model"][k] for s in saved])
        assert whole.shape[0] == 8  # E
        torch.testing.assert_close(full["model"][k], whole, rtol=0, atol=0)
        torch.testing.assert_close(quarter["model"][k], whole[6:8], rtol=0, atol=0)
    for i in ids:
        whole = torch.cat([s["optimizer"]["state"][i]["exp_avg"] for s in saved])
        torch.testing.assert_close(full["optimizer"]["state"][i]["exp_avg"], whole)
        torch.testing.assert_close(quarter["optimizer"]["state"][i]["exp_avg"], whole[6:8])
    with pytest.raises(ValueError, match=r"--expert-parallel one of \[1, 2, 4\]"):
        load(run, device=cpu, rank=0, world=WORLD, experts=shard(0, 3))
    with pytest.raises(ValueError, match="resume it on 4 ranks"):
        load(run, device=cpu, rank=0, world=2, experts=shard(0, 2))


def _state(step: int) -> dict:
    return {"step": step, "data": {"n": step}, "rng": {}, "config": {"moe": {"num_experts": 8}}}


def test_checkpoint_takes_only_the_committed_rank_files(tmp_path):
    run = RunDir(tmp_path)
    ck = run.checkpoints_dir
    ck.mkdir(parents=True)
    meta = lambda step: {"step": step, "world": 2, "expert_parallel": 1}  # noqa: E731
    write = lambda name, step: torch.save({**_state(step), "checkpoint": meta(step)}, ck / name)  # noqa: E731
    write("rank0.previous.pt", 5)
    write("rank0.pt", 10)  # written, but the save died before committing last.pt
    write("last.pt", 5)
    load = lambda: checkpoint.load(run, device=torch.device("cpu"), rank=0, world=2).state  # noqa: E731
    assert load()["data"] == {"n": 5}
    write("last.pt", 10)  # committed
    assert load()["data"] == {"n": 10}
    (ck / "rank0.pt").unlink()
    with pytest.raises(RunDirError, match="no readable rank0.pt of step 10"):
        load()
