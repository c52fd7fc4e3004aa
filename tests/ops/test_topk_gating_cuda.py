"""CUDA top-k gating (csrc/cuda/topk_gating.cu) against the plain-torch reference.

GPU tests carry the ``gpu`` marker (skipped without a device); the CPU tests at the end check the
backend's declines, the compiled exports and the autograd wiring of a backend ``backward``.
"""

import importlib

import pytest
import torch

import moe_kernels as mk
from moe_kernels.ops import _select as S
from moe_kernels.ops.topk_gating import topk_gating_backward_reference, topk_gating_reference

from .util import assert_close

# The module itself (moe_kernels.ops re-exports the function of the same name).
gating = importlib.import_module("moe_kernels.ops.topk_gating")

ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [
    (0, 8, 2),  # T = 0: empty outputs, no launch
    (1, 8, 1),  # T = 1, K = 1
    (64, 8, 2),
    (33, 7, 7),  # prime E, K = E
    (16, 16, 16),  # K = E = the top-k limit
    (40, 1, 1),  # E = 1
    (100, 32, 4),  # E = one warp exactly
    (77, 33, 5),  # E one past a warp: two values per lane, most of the second padding
    (90, 100, 16),  # E not a power of two, K at the limit
    (300, 256, 16),  # E and K at the limits
    (20, 256, 1),
    (5000, 64, 8),  # many tokens: every warp of the grid-stride loop busy
]


def scores_of(logits, score):
    z = logits.to(S.weight_dtype_for(logits.dtype))
    return torch.softmax(z, -1) if score == "softmax" else torch.sigmoid(z)


def weights_at(logits, experts, score, normalize):
    """The reference weights at given expert ids (so weights are checked even where a near tie
    let the kernel pick a different, equally valid expert)."""
    w = scores_of(logits, score).gather(-1, experts.long())
    return w / w.sum(-1, keepdim=True) if normalize else w


def assert_ids_match(e, e_ref, logits, bias, score, k):
    """Without a bias, selection runs on the logits themselves: ids must match exactly, ties
    included. With a bias, selection runs on score + bias, and the kernel's fp32 scores may differ
    from torch's in the last bit; tokens whose top k + 1 selection values lie within a few ulps of
    each other (near ties) may then legitimately resolve differently. Those tokens must be rare,
    and there the kernel's selection values must still equal the reference's sorted ones."""
    assert e.dtype == torch.int32 and e.shape == e_ref.shape
    if bias is None or e.numel() == 0:
        assert torch.equal(e, e_ref)
        return
    acc = S.weight_dtype_for(logits.dtype)
    sel = scores_of(logits, score) + bias.to(acc)
    top = sel.sort(-1, descending=True).values[:, : k + 1]
    eps = 8 * torch.finfo(acc).eps * top.abs().amax(-1, keepdim=True)
    near = ((top[:, :-1] - top[:, 1:]) <= eps).any(-1)
    assert torch.equal(e[~near], e_ref[~near])
    assert int(near.sum()) <= max(2, 0.02 * e.shape[0]), "too many near ties"
    picked = sel[near].gather(-1, e[near].long().clamp(min=0))
    torch.testing.assert_close(picked, top[near, :k], atol=2 * eps.max().item(), rtol=0)


def make_inputs(T, E, dtype, bias_kind, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g).to(dtype).cuda()
    bias = None
    if bias_kind == "random":
        bias = (0.1 * torch.randn(E, generator=g)).cuda()
    return logits, bias


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias_kind", [None, "random"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("T,E,K", SHAPES)
def test_forward_backward_match_reference(dtype, score, bias_kind, normalize, T, E, K):
    logits, bias = make_inputs(T, E, dtype, bias_kind, seed=T * 1000 + E + K)
    z = logits.clone().requires_grad_(True)
    w, e = mk.topk_gating(z, K, score=score, bias_E=bias, normalize=normalize, backend="cuda")
    w_ref, e_ref = topk_gating_reference(logits, K, score, bias, normalize)
    wdtype = S.weight_dtype_for(dtype)
    assert w.dtype == wdtype and w.shape == (T, K) and w.is_cuda and e.is_cuda
    assert_ids_match(e, e_ref, logits, bias, score, K)
    assert_close(w, weights_at(logits, e, score, normalize), wdtype, "weights")
    same = (e == e_ref).all(-1)
    assert_close(w[same], w_ref[same], wdtype, "weights vs reference")
    if normalize and T:
        assert_close(w.sum(-1), torch.ones(T, dtype=wdtype, device="cuda"), wdtype, "sum")
    # backward: the CUDA kernel (through autograd) against the plain-torch reference backward
    grad = torch.randn(T, K, generator=torch.Generator().manual_seed(7), dtype=wdtype).cuda()
    (w * grad).sum().backward()
    expected = topk_gating_backward_reference(grad, logits, e, score, normalize)
    assert z.grad.dtype == dtype and z.grad.shape == (T, E)
    assert_close(z.grad, expected, dtype, "dlogits")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_backward_matches_autograd_of_reference(dtype, score, normalize):
    logits, bias = make_inputs(200, 48, dtype, "random", seed=11)
    r = torch.randn(200, 6, dtype=dtype, device="cuda")
    z = logits.clone().requires_grad_(True)
    w, e = mk.topk_gating(z, 6, score=score, bias_E=bias, normalize=normalize, backend="cuda")
    (w * r).pow(2).sum().backward()
    z_ref = logits.clone().requires_grad_(True)
    w_ref, e_ref = topk_gating_reference(z_ref, 6, score, bias, normalize)
    (w_ref * r).pow(2).sum().backward()
    same = (e == e_ref).all(-1)  # near ties aside (see assert_ids_match), the same selection
    assert int(same.sum()) >= 196
    assert_close(z.grad[same], z_ref.grad[same], dtype, "dlogits vs autograd")


@pytest.mark.gpu
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck(score, normalize, with_bias):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 40, dtype=torch.float64, generator=g).cuda().requires_grad_(True)
    bias = torch.rand(40, generator=g).cuda() if with_bias else None
    fn = lambda z: mk.topk_gating(  # noqa: E731
        z, 5, score=score, bias_E=bias, normalize=normalize, backend="cuda"
    )[0]
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_lower_index(dtype):
    logits = torch.zeros(4, 40, dtype=dtype, device="cuda")
    logits[1, 37] = 1.0  # one winner, then a 39-way tie across both register slots of the lanes
    logits[2, 33:] = 2.0  # a tie that spans lanes 1..7 of the second slot
    logits[3, ::2] = 1.0  # ties among the even experts first
    _, e = mk.topk_gating(logits, 5, backend="cuda")
    assert e.tolist() == [
        [0, 1, 2, 3, 4],
        [37, 0, 1, 2, 3],
        [33, 34, 35, 36, 37],
        [0, 2, 4, 6, 8],
    ]
    _, e_ref = topk_gating_reference(logits, 5)
    assert torch.equal(e, e_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_ties_and_bias_steering(score):
    # Equal logits and equal biases give bitwise equal selection values: ties to the lower id.
    logits = torch.zeros(2, 70, device="cuda")
    bias = torch.zeros(70, device="cuda")
    bias[[5, 66, 69]] = 0.5
    _, e = mk.topk_gating(logits, 4, score=score, bias_E=bias, backend="cuda")
    assert e.tolist() == [[5, 66, 69, 0], [5, 66, 69, 0]]
    # Integer-spaced biases decide the order alone (scores lie in (0, 1)); weights stay unbiased.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g).cuda()
    bias = torch.randperm(50, generator=g).float().cuda()
    w, e = mk.topk_gating(logits, 3, score=score, bias_E=bias, normalize=False, backend="cuda")
    assert torch.equal(e.long(), torch.argsort(bias, descending=True)[:3].expand(64, 3))
    assert_close(w, scores_of(logits, score).gather(-1, e.long()), torch.float32, "weights")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_non_finite_logits_flag_the_token(dtype, score):
    # The CUDA backend cannot raise without a host sync: NaN weights, ids -1, NaN gradients.
    logits, _ = make_inputs(10, 12, dtype, None, seed=5)
    logits[3, 1] = float("nan")
    logits[5, 0] = float("inf")
    logits[7, 11] = float("-inf")
    bad = torch.zeros(10, dtype=torch.bool, device="cuda")
    bad[[3, 5, 7]] = True
    z = logits.clone().requires_grad_(True)
    w, e = mk.topk_gating(z, 3, score=score, backend="cuda")
    assert torch.isnan(w[bad]).all() and (e[bad] == -1).all()
    w_ref, e_ref = topk_gating_reference(logits[~bad], 3, score)
    assert torch.equal(e[~bad], e_ref)
    assert_close(w[~bad], w_ref, S.weight_dtype_for(dtype), "finite rows")
    w.nan_to_num(0.0).sum().backward()
    assert torch.isnan(z.grad[bad]).all()
    assert torch.isfinite(z.grad[~bad]).all()
    # Such ids are skipped by the CUDA route: the flagged tokens get no rows.
    plan = mk.route(e, 12, backend="cuda")
    assert (plan.slot_row_TK[bad] == -1).all() and (plan.slot_row_TK[~bad] >= 0).all()
    assert int(plan.counts_E.sum()) == 7 * 3


@pytest.mark.gpu
def test_no_host_sync():
    logits, bias = make_inputs(512, 64, torch.bfloat16, "random", seed=1)
    z = logits.clone().requires_grad_(True)
    r = torch.randn(512, 8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        w, e = mk.topk_gating(z, 8, bias_E=bias, backend="cuda")
        (dz,) = torch.autograd.grad((w * r).sum(), z)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert_close(
        dz, topk_gating_backward_reference(r, logits, e, "softmax", True), torch.bfloat16, "dlogits"
    )


@pytest.mark.gpu
def test_cuda_graph_capture():
    logits, bias = make_inputs(256, 64, torch.float32, "random", seed=2)
    run = lambda: mk.topk_gating(logits, 4, bias_E=bias, backend="cuda")  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, e = run()
    new, _ = make_inputs(256, 64, torch.float32, None, seed=3)
    logits.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    w_ref, e_ref = topk_gating_reference(new, 4, "softmax", bias, True)
    assert_ids_match(e, e_ref, new, bias, "softmax", 4)
    assert_close(w, weights_at(new, e, "softmax", True), torch.float32, "weights")


@pytest.mark.gpu
def test_opcheck_and_compile():
    logits = torch.randn(12, 40, device="cuda", requires_grad=True)
    for bias in (None, torch.rand(40, device="cuda")):
        torch.library.opcheck(
            torch.ops.moe_kernels.topk_gating.default, (logits, 3, "softmax", bias, True, "cuda")
        )
    w, e = mk.topk_gating(logits.detach(), 3, backend="cuda")
    torch.library.opcheck(
        torch.ops.moe_kernels.topk_gating_backward.default,
        (torch.randn_like(w), logits.detach(), e, "sigmoid", False, "cuda"),
    )

    def f(z):
        w, _ = mk.topk_gating(z, 3, score="sigmoid", backend="cuda")
        return (w * w).sum()

    z = logits.detach().clone().requires_grad_(True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(z).backward()
    z2 = logits.detach().clone().requires_grad_(True)
    f(z2).backward()
    assert torch.equal(z.grad, z2.grad)


# ---- CPU-runnable: declines, exports, autograd wiring ------------------------------------------


def test_cuda_backend_declines_cpu_tensors_with_a_reason():
    with pytest.raises(mk.NoBackendError) as info:
        mk.topk_gating(torch.randn(4, 8), 2, backend="cuda")
    msg = str(info.value)
    assert "cuda:" in msg
    assert "needs CUDA tensors, got cpu" in msg or "without CUDA" in msg or "not built" in msg


def test_cuda_backend_limits_are_reasons():
    cuda = S.by_name(gating.BACKENDS, "cuda")
    assert isinstance(cuda, gating.CudaTopkGating) and gating.BACKENDS[0] is cuda
    reasons = cuda.not_supported_reasons(logits=torch.empty(2, 300), bias=None, k=17)
    assert any("E = 300 experts > 256" in r for r in reasons), reasons
    assert any("k = 17 > 16" in r for r in reasons), reasons
    ok = cuda.not_supported_reasons(logits=torch.empty(2, 256), bias=None, k=16)
    assert not any("experts >" in r or "k =" in r for r in ok), ok


def test_cpu_selection_unchanged_by_the_cuda_backend():
    # Automatic selection on CPU tensors skips cuda (and triton) and lands on a CPU backend.
    w, e = mk.topk_gating(torch.randn(6, 8), 2)
    assert w.device.type == "cpu" and e.dtype == torch.int32


@pytest.mark.skipif(not S._C_HAS_CUDA, reason="moe_kernels._C built without CUDA")
def test_compiled_exports_and_limits():
    for name in ("topk_gating_cuda", "topk_gating_backward_cuda"):
        assert hasattr(S._C, name), name
    assert S._C.topk_gating_cuda_max_experts == gating.CUDA_MAX_EXPERTS
    assert S._C.topk_gating_cuda_max_top_k == gating.CUDA_MAX_TOP_K


@pytest.mark.skipif(not S._C_HAS_CUDA, reason="moe_kernels._C built without CUDA")
def test_binding_checks_sizes_before_any_cuda_call():
    # (logits, dtype, T, E, K, score, bias, normalize, weights, experts, stream)
    with pytest.raises(ValueError, match="E: expected 1 <= E <= 256, got 300"):
        S._C.topk_gating_cuda(0, 0, 4, 300, 2, 0, 0, True, 0, 0, 0)
    with pytest.raises(ValueError, match="K: expected 1 <= K <= min"):
        S._C.topk_gating_cuda(0, 0, 4, 64, 17, 0, 0, True, 0, 0, 0)
    with pytest.raises(ValueError, match="score"):
        S._C.topk_gating_backward_cuda(0, 0, 0, 0, 4, 64, 2, 2, True, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        S._C.topk_gating_cuda(0, 7, 4, 64, 2, 0, 0, True, 0, 0, 0)


def test_autograd_uses_a_backend_backward_when_it_has_one(monkeypatch):
    """The CUDA backend's kernel backward is reached through the backend's ``backward`` method;
    shown here on CPU by giving the cpu backend one."""
    assert not hasattr(S.by_name(gating.BACKENDS, "cpu"), "backward")
    calls = []

    def backward(self, grad_w, logits, experts, score, normalize):
        calls.append((score, normalize))
        return topk_gating_backward_reference(grad_w, logits, experts, score, normalize)

    logits = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    z = logits.clone().requires_grad_(True)
    w, e = mk.topk_gating(z, 2, score="sigmoid", backend="cpu")
    w.sum().backward()
    assert calls == []  # no backward method: the reference backend's (plain torch)
    plain = z.grad.clone()
    monkeypatch.setattr(gating.CpuTopkGating, "backward", backward, raising=False)
    z.grad = None
    w, e = mk.topk_gating(z, 2, score="sigmoid", backend="cpu")
    w.sum().backward()
    assert calls == [("sigmoid", True)]
    assert torch.equal(z.grad, plain)
    torch.library.opcheck(
        torch.ops.moe_kernels.topk_gating.default, (z, 2, "softmax", None, False, "cpu")
    )
