"""Expert parallelism over ``torch.distributed``: experts sharded over ranks, rows exchanged with
``all_to_all_single``.

Legend: T tokens (this rank), D d_model, E experts (all ranks), P expert-parallel (EP) ranks,
L = E / P experts per rank, K slots per token, N plan rows (this rank's routed rows), R received
rows, B rows per destination block (padded exchange).

What is sharded and what is not. ``MoE(..., ep_group=g)`` (or :func:`expert_parallel` on a built
model) keeps experts ``[r*L, (r+1)*L)`` on EP rank r, a contiguous block so that the plan's
expert-contiguous rows are also contiguous per destination rank; ``E % P != 0`` is a ValueError.
The layer is built whole and then sliced, so an EP layer holds exactly the experts the
single-process layer of the same seed holds (the full expert tensors exist briefly on every
rank while it is built). The router, the shared experts and the balancing state stay
replicated: every rank routes its own tokens over all E experts with global expert ids.
``ep_group`` is a ``ProcessGroup``, a 1-D ``DeviceMesh``, or a 2-D ``DeviceMesh`` whose
dimensions are named ``("dp", "ep")`` (the "ep" dimension shards the experts, the "dp" one
replicates them; ``mesh["ep"]`` alone is a 1-D mesh).

Forward of one layer (:func:`routed_experts`):

1. ``route`` over all E experts at the source (capacity from this rank's T, exactly as under
   data parallelism: every source sends at most C rows to each expert, so an expert receives
   at most P * C), ``dispatch`` into expert-contiguous rows.
2. Per-expert kept counts ``(P, L)`` exchanged with one small even ``all_to_all_single``.
3. The rows exchanged with ``all_to_all_single`` and uneven splits (or fixed blocks, below).
4. Received rows are grouped by source, then by local expert; the op contract's ``route`` on
   their local expert ids gives the plan that :class:`~moe_kernels.experts.GroupedExperts`
   (local experts only) runs, returning one output row per received row in received order.
5. The reverse exchange brings every row back to its source, where ``combine`` applies the
   gate weights, so the gate weights' gradient never leaves the rank that routed the token.

Autograd: both exchanges are :class:`_Exchange` (the backward of an exchange is the exchange
with the splits swapped). ``torch.distributed.nn.functional.all_to_all_single`` does the same
but is deprecated in favour of functional collectives and reports failures without saying which
peer failed; ``_Exchange`` routes every exchange through :meth:`Peers.guard`. Every rank of
the EP group must run every forward and backward of the layer together (as DDP requires).

Host synchronisations. Uneven splits (the default) need the split sizes as Python ints:
``all_to_all_single`` takes them as lists, so each layer forward reads 2 * P ints (rows sent to
and received from each rank) with one ``.tolist()``; the backward reuses them (no sync). Nothing
else synchronises: the received rows' expert ids come from ``repeat_interleave`` with the
known output size and the plans are built on device. ``pad=True`` (``MoE(..., ep_pad=True)``)
removes that sync: every rank sends a fixed block of B = min(T * min(K, L), L * C) rows to
every rank (C the capacity; dropless: T * min(K, L)), padding included, so the exchange moves
P * B rows each way and the receiver runs its experts on up to P * B rows. Padding rows carry
expert id L (one past the local experts) and are dropped from the plan. Every rank must then
pass the same T, and the memory of P * B rows per direction is the caller's to accept.

Balancing and statistics across ranks: the counts of ``global_batch`` scope and of the
aux-free window are all-reduced over the default process group (every rank that saw tokens
of the step, EP and DP ranks alike: under EP every rank routes its own tokens), and
``moe_kernels.stats.read(..., all_reduce=True)`` sums statistics over the same ranks, so
every rank reports the same global figures. ``micro_batch`` scope stays this rank's tokens.

EP x DP (2-D mesh ``("dp", "ep")``): non-expert parameters are replicated on every rank and
averaged by DDP over the whole world (:func:`data_parallel` hides the expert parameters from
DDP); expert parameters are replicated only across "dp". Each rank's loss is the mean over its
own tokens and DDP averages over the W ranks, so the objective is (1/W) sum_r loss_r; the
gradient an expert holds on rank (d, j) already sums the contributions of every token of EP
group d (they came back through the reverse exchange), so :func:`reduce_expert_grads` sums it
over "dp" and divides by W. The result equals one process on the concatenated batch with the
mean loss. :func:`clip_grad_norm_` adds the expert shards' squared norms over "ep".

Faults: :class:`Peers` records the (host, pid) of every rank while all are up; when a
collective fails, the error (:class:`PeerFailure`) names the ranks whose process has exited
(checked on this host) instead of hanging or reporting only a broken socket. A stalled peer
is caught by the process group's timeout (``init_process_group(timeout=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moe_kernels.experts import GroupedExperts, compute_dtype
from moe_kernels.ops import RoutingPlan, combine, dispatch, route
from moe_kernels.ops import _select as S
from moe_kernels.peers import PeerFailure, Peers

__all__ = [
    "EPGroup",
    "PeerFailure",
    "Peers",
    "block_rows",
    "clip_grad_norm_",
    "data_parallel",
    "expert_parallel",
    "expert_parameters",
    "init_mesh",
    "reduce_expert_grads",
    "resolve",
    "routed_experts",
    "shard_experts",
]


@dataclass(frozen=True)
class EPGroup:
    """A resolved expert-parallel group: the process group, its size P and this rank's index
    in it, the data-parallel group of replicas (2-D mesh; None otherwise) and the peers."""

    group: dist.ProcessGroup
    size: int
    rank: int
    dp_group: dist.ProcessGroup | None
    peers: Peers


def _is_mesh(obj) -> bool:
    return hasattr(obj, "get_group") and hasattr(obj, "mesh_dim_names") and hasattr(obj, "ndim")


def resolve(ep_group) -> EPGroup:
    """An :class:`EPGroup` from a ``ProcessGroup``, a 1-D ``DeviceMesh``, a 2-D ``DeviceMesh``
    with dimensions ``("dp", "ep")`` or an ``EPGroup`` (returned as is). A collective over the
    group (the peer table): every rank of it must call.

    Raises TypeError for other objects, ValueError when torch.distributed is not initialised or
    a 2-D mesh lacks an "ep" dimension.
    """
    if isinstance(ep_group, EPGroup):
        return ep_group
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "ep_group: expert parallelism needs torch.distributed initialised "
            "(init_process_group), got an uninitialised default group"
        )
    dp = None
    if _is_mesh(ep_group):
        names = tuple(ep_group.mesh_dim_names or ())
        if ep_group.ndim == 1:
            group = ep_group.get_group()
        elif ep_group.ndim == 2 and "ep" in names:
            group = ep_group.get_group("ep")
            dp = ep_group.get_group(names[1 - names.index("ep")])
        else:
            raise ValueError(
                "ep_group: expected a 1-D DeviceMesh or a 2-D one with dimensions ('dp', 'ep'), "
                f"got a {ep_group.ndim}-D mesh with dimensions {names}"
            )
    elif isinstance(ep_group, dist.ProcessGroup):
        group = ep_group
    else:
        raise TypeError(
            "ep_group: expected None, a ProcessGroup, a DeviceMesh or an EPGroup, "
            f"got {type(ep_group).__name__}"
        )
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return EPGroup(group, size, rank, dp, Peers.gather(group))


def init_mesh(expert_parallel: int, device_type: str = "cpu"):
    """A 2-D ``DeviceMesh`` ``("dp", "ep")`` over the whole world, EP ranks adjacent (rank =
    dp_index * expert_parallel + ep_index, so an EP group sits on one node when it fits).

    Raises ValueError when ``expert_parallel`` does not divide the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if isinstance(expert_parallel, bool) or not isinstance(expert_parallel, int):
        raise TypeError(f"expert_parallel: expected an int, got {type(expert_parallel).__name__}")
    if expert_parallel < 1 or world % expert_parallel:
        raise ValueError(
            f"expert_parallel: expected a divisor of the world size {world}, got {expert_parallel}"
        )
    shape = (world // expert_parallel, expert_parallel)
    return init_device_mesh(device_type, shape, mesh_dim_names=("dp", "ep"))


# ---- the exchange ----------------------------------------------------------------------------


def _all_to_all(x, out_rows, in_rows, ep: EPGroup, what: str) -> torch.Tensor:
    """``all_to_all_single`` into a new tensor; ``out_rows``/``in_rows`` None = even splits."""
    x = x.contiguous()
    n_out = x.shape[0] if out_rows is None else sum(out_rows)
    out = x.new_empty((n_out, *x.shape[1:]))
    with ep.peers.guard(what):
        dist.all_to_all_single(out, x, out_rows, in_rows, group=ep.group)
    return out


class _Exchange(torch.autograd.Function):
    """Rows to the other ranks of the EP group; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x_XD, out_rows, in_rows, ep, what):
        ctx.out_rows, ctx.in_rows, ctx.ep, ctx.what = out_rows, in_rows, ep, what
        return _all_to_all(x_XD, out_rows, in_rows, ep, what)

    @staticmethod
    def backward(ctx, dy):
        dx = _all_to_all(dy, ctx.in_rows, ctx.out_rows, ctx.ep, f"backward of {ctx.what}")
        return dx, None, None, None, None


def block_rows(num_tokens: int, slots: int, local_experts: int, capacity: int | None) -> int:
    """B, the rows one source can send one destination: a token's slots name distinct experts,
    so at most min(K, L) of them land on one rank, and a capacity caps each expert at C."""
    b = num_tokens * min(slots, local_experts)
    return b if capacity is None else min(b, local_experts * capacity)


def _local_plan(ids_R: torch.Tensor, L: int, backend, padded: bool) -> RoutingPlan:
    """The plan of received rows by local expert (``route`` with K = 1). With ``padded``, id L
    marks a padding row: it is routed to a spare expert L whose rows the plan then drops."""
    ids = ids_R.to(torch.int32).reshape(-1, 1)
    if not padded:
        return route(ids, L, backend=backend)
    p = route(ids, L + 1, backend=backend)
    real_N = torch.arange(p.num_rows, device=ids.device) < p.offsets_E1[L]
    local = RoutingPlan(
        p.counts_E[:L],
        p.kept_E[:L],
        p.offsets_E1[: L + 1],
        torch.where(real_N, p.row_slot_N, -1),
        torch.where(ids < L, p.slot_row_TK, -1),
        torch.where(real_N, p.row_token_N, -1),
    )
    # route's valid plan with entries set to -1: valid too, so the ops need not check it again
    S.mark_valid(local.offsets_E1, local.row_slot_N, local.slot_row_TK)
    return local


def _uneven(experts, x_ND, plan, recv_PL, ep) -> torch.Tensor:
    P, L = recv_PL.shape
    sizes = torch.cat([plan.kept_E.reshape(P, L).sum(1), recv_PL.sum(1)]).tolist()  # the sync
    send, recv = sizes[:P], sizes[P:]
    n = sum(send)
    x_RD = _Exchange.apply(x_ND[:n], recv, send, ep, "expert dispatch")
    local_P = torch.arange(L, device=x_ND.device).repeat(P)
    ids_R = torch.repeat_interleave(local_P, recv_PL.reshape(-1).long(), output_size=sum(recv))
    y_RD = experts(x_RD, _local_plan(ids_R, L, experts.backend, padded=False), None)
    y_nD = _Exchange.apply(y_RD, send, recv, ep, "expert return")
    return torch.cat([y_nD, y_nD.new_zeros(plan.num_rows - n, y_nD.shape[1])])


def _padded(experts, x_ND, plan, recv_PL, ep, B: int) -> torch.Tensor:
    P, L = recv_PL.shape
    N, dev = plan.num_rows, x_ND.device
    off = plan.offsets_E1.long()
    start_P, end_P = off[0:-1:L], off[L::L]  # rows of destination r: [start, end)
    j_B = torch.arange(B, device=dev)
    src_PB = torch.where(j_B < (end_P - start_P)[:, None], start_P[:, None] + j_B, N)
    zero = x_ND.new_zeros(1, x_ND.shape[1])
    x_SD = torch.cat([x_ND, zero])[src_PB.reshape(-1)]  # (P * B, D), zero padding rows
    x_RD = _Exchange.apply(x_SD, None, None, ep, "expert dispatch (padded)")
    # Block s holds source s's rows grouped by local expert; rows past its total are padding.
    ids_PB = torch.searchsorted(recv_PL.long().cumsum(1), j_B.expand(P, B).contiguous(), right=True)
    y_RD = experts(x_RD, _local_plan(ids_PB, L, experts.backend, padded=True), None)
    y_SD = _Exchange.apply(y_RD, None, None, ep, "expert return (padded)")
    rows_N = torch.arange(N, device=dev)
    dest_N = (torch.searchsorted(off[1:], rows_N, right=True) // L).clamp_max(P - 1)
    slot_N = torch.where(rows_N < off[-1], dest_N * B + rows_N - start_P[dest_N], P * B)
    return torch.cat([y_SD, zero.to(y_SD.dtype)])[slot_N]


def routed_experts(
    experts: GroupedExperts,
    x_TD: torch.Tensor,
    plan: RoutingPlan,
    weights_TK: torch.Tensor | None,
    ep: EPGroup,
    *,
    capacity: int | None = None,
    pad: bool = False,
) -> torch.Tensor:
    """Expert output per token (T, D) in the compute dtype, with ``experts`` holding this rank's
    L = E / P experts and ``plan`` routing this rank's tokens over all E (module docstring).

    Args:
        experts: the local experts (``shard_experts``).
        x_TD: (T, D) this rank's tokens.
        plan: ``route`` of this rank's decision over all E experts (global ids).
        weights_TK: (T, K) gate weights, applied at the source by ``combine``; None = unit.
        ep: the resolved group (:func:`resolve`).
        capacity: the plan's capacity per expert (None = dropless); sizes the padded blocks.
        pad: fixed-size padded blocks, no host synchronisation (module docstring).
    Raises ValueError when ``plan`` does not route over ``P * L`` experts; :class:`PeerFailure`
    when an exchange fails.
    """
    P, L = ep.size, experts.num_experts
    if plan.num_experts != P * L:
        raise ValueError(
            f"plan: expected a plan over {P * L} experts ({P} ranks x {L} local experts), "
            f"got {plan.num_experts}"
        )
    b = experts.backend
    x_ND = dispatch(x_TD.to(compute_dtype(x_TD)).contiguous(), plan, backend=b)
    kept_PL = plan.kept_E.reshape(P, L)
    recv_PL = _all_to_all(kept_PL, None, None, ep, "expert count exchange")
    if pad:
        B = block_rows(x_TD.shape[0], plan.top_k, L, capacity)
        y_ND = _padded(experts, x_ND, plan, recv_PL, ep, B)
    else:
        y_ND = _uneven(experts, x_ND, plan, recv_PL, ep)
    return combine(y_ND.contiguous(), weights_TK, plan, backend=b)


# ---- sharding, data parallelism, gradients ---------------------------------------------------


@torch.no_grad()
def shard_experts(experts: GroupedExperts, ep: EPGroup) -> None:
    """Keep this rank's block of experts ``[rank * L, (rank + 1) * L)`` of ``experts`` (in
    place: every expert tensor is sliced along its expert dimension into a new Parameter).

    Raises ValueError when the number of experts is not a multiple of the EP size.
    """
    E, P = experts.num_experts, ep.size
    if E % P:
        raise ValueError(
            f"num_experts: expected a multiple of the expert-parallel size {P}, got {E}"
        )
    L = E // P
    lo = ep.rank * L
    for name, p in list(experts.named_parameters(recurse=False)):
        shard = nn.Parameter(p[lo : lo + L].clone(), requires_grad=p.requires_grad)
        setattr(experts, name, shard)
    experts.num_experts = L


def _ep_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "ep", None), EPGroup)]


def expert_parallel(model: nn.Module, ep_group, *, pad: bool = False) -> EPGroup:
    """Shard the experts of every ``MoE`` layer of ``model`` over ``ep_group`` (in place; every
    rank of the group calls it, with the same model built from the same seed). Returns the
    resolved group. Raises ValueError for a model without MoE layers and what :func:`resolve`
    and :func:`shard_experts` raise."""
    layers = [m for m in model.modules() if callable(getattr(m, "shard_experts", None))]
    if not layers:
        raise ValueError("model: expected at least one moe_kernels.MoE layer, found none")
    ep = resolve(ep_group)
    for m in layers:
        m.shard_experts(ep, pad=pad)
    return ep


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Qualified name -> parameter of every sharded expert tensor of ``model`` (the names DDP
    must ignore and the checkpoint saves per rank)."""
    out = {}
    for name, m in _ep_layers(model):
        for pname, p in m.experts.named_parameters():
            out[f"{name}.experts.{pname}" if name else f"experts.{pname}"] = p
    return out


def data_parallel(model: nn.Module, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel`` over the default group for everything but the sharded
    experts (hidden from DDP: it would broadcast rank 0's experts and average gradients of
    different experts); reduce those with :func:`reduce_expert_grads` after the backward."""
    ignore = list(expert_parameters(model))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def _groups(model: nn.Module) -> EPGroup:
    layers = _ep_layers(model)
    if not layers:
        raise ValueError("model: expected expert-parallel MoE layers, found none")
    return layers[0][1].ep


@torch.no_grad()
def reduce_expert_grads(
    model: nn.Module, dp_group: dist.ProcessGroup | None = None, world_size: int | None = None
) -> None:
    """Make the expert gradients those of the mean loss over all ranks: sum over the
    data-parallel replicas (``dp_group``, default the layers' "dp" mesh dimension) and divide by
    the world size (module docstring). Call once per optimizer step, after the last backward,
    on every rank. A missing gradient counts as zero.

    Raises ValueError when the world is not EP size x DP size.
    """
    ep = _groups(model)
    dp = dp_group if dp_group is not None else ep.dp_group
    world = world_size if world_size is not None else dist.get_world_size()
    dp_size = 1 if dp is None else dist.get_world_size(dp)
    if ep.size * dp_size != world:
        raise ValueError(
            f"dp_group: expected {world} ranks = EP size {ep.size} x DP size, got DP size "
            f"{dp_size}; pass the data-parallel group of the expert replicas"
        )
    params = [p for p in expert_parameters(model).values() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if dp_size > 1:
        with ep.peers.guard("expert gradient all-reduce"):
            dist.all_reduce(flat, group=dp)
    flat.div_(world)
    i = 0
    for p in params:
        p.grad.copy_(flat[i : i + p.numel()].view_as(p))
        i += p.numel()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole (sharded) model: the norm of every
    gradient of all ranks, counting replicated parameters once (call after DDP and
    :func:`reduce_expert_grads`). Returns the total norm (fp32 scalar, same on every rank)."""
    ep = _groups(model)
    sharded = {id(p) for p in expert_parameters(model).values()}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    dev = grads[0].device if grads else torch.device("cpu")
    sq = lambda gs: sum((g.float().square().sum() for g in gs), torch.zeros((), device=dev))
    local = sq([p.grad for p in model.parameters() if p.grad is not None and id(p) in sharded])
    with ep.peers.guard("gradient norm all-reduce"):
        dist.all_reduce(local, group=ep.group)
    replicated = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in sharded]
    total = (sq(replicated) + local).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
