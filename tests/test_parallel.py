"""Expert parallelism (moe_kernels.parallel): spawned gloo processes against one process.

Every case builds the same layer (same seed) on every rank, sharded over an EP group, under
``parallel.data_parallel`` (DDP for the router, ``reduce_expert_grads`` for the experts), runs
one forward and backward of ``loss_r = <y_r, g_r> + aux_r`` on rank r's tokens and compares
with one process holding all experts, whose loss is the mean over ranks:

- dropless (``global_batch`` scope): the concatenated batch in one call;
- with a capacity (``micro_batch`` scope): the capacity is per micro-batch at the source, as
  under data parallelism, so the single process runs each rank's micro-batch in turn.

Outputs, input gradients (x 1/W: the reference loss is the mean), every parameter gradient,
the aux loss and the all-reduced routing statistics must agree to float tolerance. The two
sessions (2 and 4 processes) end with a failure: a killed, a raising and a stalled rank.
"""

from __future__ import annotations

import datetime
import os
import signal
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from moe_kernels import MoE, parallel, stats

D, F, E, K, G = 8, 12, 8, 2, 2  # G domains for the reference router (E / G experts each)
B, S = 2, 6  # sequences x tokens per rank
TIMEOUT_S = 60  # collective timeout of the sessions; the stalled rank gets STALL_S
STALL_S = 3

# (router, capacity_factor, ep_pad, extra layer fields); capacity 1.0 drops under skew.
CASES = [
    ("learned", None, False, {}),
    ("learned", 1.0, False, {"shared_experts": 1}),
    ("reference", None, True, {}),
    ("reference", 1.0, True, {"activation": "gelu", "expert_bias": True}),
    ("learned", None, True, {"drop": "score", "score": "sigmoid"}),
    ("reference", 0.75, False, {"drop": "score"}),
]


def _layer(case: int, ep_group=None) -> MoE:
    router, cf, pad, extra = CASES[case]
    torch.manual_seed(100 + case)
    scope = "global_batch" if cf is None else "micro_batch"
    groups = {"num_groups": G} if router == "reference" else {}
    return MoE(
        D, F, E, K, router=router, capacity_factor=cf, scope=scope, aux_coef=0.1, z_coef=1e-3,
        ep_group=ep_group, ep_pad=pad if ep_group is not None else False, **groups, **extra,
    )  # fmt: skip


def _data(case: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x (B, S, D), labels (B, S), cotangent g (B, S, D)) of every rank."""
    gen = torch.Generator().manual_seed(7 + 31 * case + world)
    out = []
    for _ in range(world):
        x = torch.randn(B, S, D, generator=gen)
        labels = torch.randint(0, G, (B, S), generator=gen)
        labels[0] = 0  # skew: a whole sequence of domain 0, so capacities drop
        out.append((x, labels, torch.randn(B, S, D, generator=gen)))
    return out


def _run_case(case: int, rank: int, world: int, ep_group, dp_group=None) -> dict:
    layer = _layer(case, ep_group)
    stats.enable(layer, num_labels=G)
    model = parallel.data_parallel(layer)
    x, labels, g = _data(case, world)[rank]
    x = x.clone().requires_grad_()
    y = model(x, labels=labels)
    ((y * g).sum() + layer.aux_loss).backward()
    parallel.reduce_expert_grads(layer, dp_group)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return {
        "y": y.detach(),
        "dx": x.grad,
        "grads": grads,
        "aux": layer.aux_loss.detach(),
        "stats": stats.read(layer, all_reduce=True),
        "local": list(layer.local_experts),
    }


def _load_full(group) -> bool:
    """A full (unsharded) state dict loads into an expert-parallel layer as this rank's block."""
    full, sharded = _layer(3), _layer(3, group)
    with torch.no_grad():
        for p in full.experts.parameters():
            p.add_(torch.randn_like(p))
    sharded.load_state_dict(full.state_dict())
    r = sharded.local_experts
    return all(
        torch.equal(p, dict(full.experts.named_parameters())[n][r.start : r.stop])
        for n, p in sharded.experts.named_parameters()
    )


def _session(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    store = f"file://{tmp}/store"  # a file store: no TCP port to race for
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=timeout)
    from torch.distributed.device_mesh import init_device_mesh

    results = {}
    if world == 2:  # EP = 2 as a ProcessGroup, a 1-D mesh and a 2-D mesh with DP = 1
        setups = {
            "pg": (dist.new_group([0, 1]), None),
            "mesh1d": (init_device_mesh("cpu", (2,)), None),
            "mesh2d": (parallel.init_mesh(2), None),
        }
    else:  # EP = 2 x DP = 2 (2-D mesh, and its "ep" dimension with the dp group), EP = 4
        mesh = parallel.init_mesh(2)
        setups = {
            "dp2xep2": (mesh, None),
            "ep_dim": (mesh["ep"], mesh.get_group("dp")),
            "ep4": (parallel.init_mesh(4), None),
        }
    for name, (group, dp) in setups.items():
        for case in range(len(CASES)):
            results[(name, case)] = _run_case(case, rank, world, group, dp)
        results[(name, "load_full")] = _load_full(group)
    torch.save(results, f"{tmp}/res{rank}.pt")
    _failures(rank, world, tmp)
    os._exit(0)  # no destroy_process_group: some peers are gone


def _failures(rank: int, world: int, tmp: str) -> None:
    """2 ranks: rank 1 is killed, rank 0 must name it. 4 ranks: rank 0 raises (rank 1 must
    name it); rank 3 stalls (rank 2 must time out after STALL_S and say that nobody exited)."""
    import torch.distributed as dist

    pair = [2 * (rank // 2), 2 * (rank // 2) + 1]
    short = datetime.timedelta(seconds=STALL_S)
    pairs = [[0, 1], [2, 3]][: world // 2]
    groups = [dist.new_group(p, timeout=short if p[0] == 2 else None) for p in pairs]
    layer = _layer(0, groups[rank // 2])
    x, labels, _ = _data(0, world)[rank]
    dist.barrier()
    if world == 2 and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if world == 4 and rank == 0:
        raise ValueError("rank 0 gives up")
    if world == 4 and rank == 3:
        while not os.path.exists(f"{tmp}/fail2.pt"):  # stall until rank 2 has given up
            time.sleep(0.1)
        return
    tic = time.monotonic()
    try:
        layer(x, labels=labels)
        out = {"error": None}
    except parallel.PeerFailure as e:
        out = {"error": str(e), "type": type(e).__name__}
    out.update(seconds=time.monotonic() - tic, pair=pair)
    torch.save(out, f"{tmp}/fail{rank}.pt")


def _spawn(world: int, tmp: str, timeout_s: float) -> list[int | None]:
    """Start ``world`` processes, wait at most ``timeout_s`` for all, kill the stragglers."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_session, args=(r, world, tmp)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return codes


@pytest.fixture(scope="module", params=[2, 4], ids=["2proc", "4proc"])
def session(request):
    world = request.param
    with tempfile.TemporaryDirectory() as tmp:
        codes = _spawn(world, tmp, timeout_s=300)
        res = [
            torch.load(f"{tmp}/res{r}.pt", weights_only=False)
            if os.path.exists(f"{tmp}/res{r}.pt")
            else None
            for r in range(world)
        ]
        fails = {
            r: torch.load(f"{tmp}/fail{r}.pt", weights_only=False)
            for r in range(world)
            if os.path.exists(f"{tmp}/fail{r}.pt")
        }
    return SimpleNamespace(world=world, codes=codes, res=res, fails=fails)


def _reference(case: int, world: int) -> dict:
    """One process, all experts: the mean loss over the ranks' micro-batches (module doc)."""
    ref = _layer(case)
    stats.enable(ref, num_labels=G)
    data = _data(case, world)
    xs = [x.clone().requires_grad_() for x, _, _ in data]
    if CASES[case][1] is None:
        y = ref(torch.cat(xs), labels=torch.cat([lab for _, lab, _ in data]))
        g = torch.cat([g for _, _, g in data])
        ((y * g).sum() / world + ref.aux_loss).backward()
        ys, auxes = list(y.detach().chunk(world)), [ref.aux_loss.detach()] * world
    else:
        ys, auxes = [], []
        for x, (_, lab, g) in zip(xs, data):
            y = ref(x, labels=lab)
            ((y * g).sum() / world + ref.aux_loss / world).backward()
            ys.append(y.detach())
            auxes.append(ref.aux_loss.detach())
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    return {
        "ys": ys,
        "dxs": [x.grad for x in xs],
        "grads": grads,
        "auxes": auxes,
        "stats": stats.read(ref),
    }


def _close(name, actual, expected, rtol=1e-5, atol=1e-5):
    err = (actual.double() - expected.double()).abs()
    print(f"{name}: max err {err.max().item() if err.numel() else 0:.2e}")
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=name)


def test_sessions_finish(session):
    assert all(r is not None for r in session.res), f"exit codes {session.codes}"


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_one_process(session, case):
    world = session.world
    assert all(r is not None for r in session.res), f"exit codes {session.codes}"
    ref = _reference(case, world)
    if CASES[case][1] is not None:  # the capacity must bite, or the case tests no dropping
        assert ref["stats"]["kept_LDE"].sum() < ref["stats"]["requested_LDE"].sum()
    for setup in sorted({name for name, c in session.res[0] if c != "load_full"}):
        for r in range(world):
            got = session.res[r][(setup, case)]
            tag = f"{setup} case {case} rank {r}"
            _close(f"{tag} y", got["y"], ref["ys"][r])
            _close(f"{tag} dx", got["dx"] / world, ref["dxs"][r])
            lo, hi = got["local"][0], got["local"][-1] + 1
            assert hi - lo == E // (4 if setup == "ep4" else 2)
            assert set(got["grads"]) == set(ref["grads"]), tag
            for n, g in got["grads"].items():
                expect = ref["grads"][n][lo:hi] if ".experts." in f".{n}" else ref["grads"][n]
                _close(f"{tag} grad {n}", g, expect)
            for k in ("requested_LDE", "kept_LDE", "tokens_L"):
                assert (got["stats"][k] == ref["stats"][k]).all(), f"{tag} {k}"
            _close(f"{tag} weight sums", torch.from_numpy(got["stats"]["weight_sum_LDE"]),
                   torch.from_numpy(ref["stats"]["weight_sum_LDE"]))  # fmt: skip
        mean_aux = torch.stack([session.res[r][(setup, case)]["aux"] for r in range(world)]).mean()
        _close(f"{setup} case {case} aux", mean_aux, torch.stack(ref["auxes"]).mean(), atol=1e-6)


def test_full_state_dict_loads_into_sharded_layers(session):
    assert all(r is not None for r in session.res), f"exit codes {session.codes}"
    loaded = {k: v for res in session.res for k, v in res.items() if k[1] == "load_full"}
    assert loaded and all(loaded.values()), loaded


def test_failed_rank_is_named_within_the_timeout(session):
    if session.world == 2:
        killed = session.fails[0]
        assert killed["type"] == "PeerFailure" and "rank 1 (pid" in killed["error"], killed
        assert "exited" in killed["error"] and killed["seconds"] < TIMEOUT_S, killed
        assert session.codes[1] == -signal.SIGKILL
        return
    raised, stalled = session.fails[1], session.fails[2]
    assert session.codes[0] not in (0, None)  # the ValueError ended rank 0
    assert raised["type"] == "PeerFailure" and "rank 0 (pid" in raised["error"], raised
    assert raised["seconds"] < TIMEOUT_S, raised
    assert stalled["type"] == "PeerFailure" and "no peer process" in stalled["error"], stalled
    assert STALL_S * 0.9 <= stalled["seconds"] < STALL_S + 10, stalled


# ---- single process: what needs no process group ---------------------------------------------


def test_block_rows_bound():
    assert parallel.block_rows(10, 2, 4, None) == 20  # dropless: every slot may land here
    assert parallel.block_rows(10, 4, 2, None) == 20  # distinct experts: at most L per token
    assert parallel.block_rows(10, 2, 4, 3) == 12  # capacity: L * C


def test_shard_experts_keeps_the_rank_block():
    layer = _layer(0)
    full = layer.experts.w2_EDF.detach().clone()
    ep = parallel.EPGroup(group=None, size=4, rank=2, dp_group=None, peers=None)
    parallel.shard_experts(layer.experts, ep)
    assert layer.experts.num_experts == 2
    torch.testing.assert_close(layer.experts.w2_EDF.detach(), full[4:6])
    with pytest.raises(ValueError, match="num_experts: expected a multiple of the expert-par"):
        parallel.shard_experts(_layer(0).experts, parallel.EPGroup(None, 3, 0, None, None))


def test_ep_group_needs_initialised_distributed():
    with pytest.raises(ValueError, match="ep_group: expert parallelism needs torch.distributed"):
        _layer(0, ep_group=object())
    assert not torch.distributed.is_initialized()
