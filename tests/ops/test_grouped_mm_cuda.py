"""CUDA grouped_mm backend (CUTLASS kernels, csrc/cuda/gemm) against the plain-torch reference.

GPU tests run every compiled kernel family the device can execute (sm90 on Hopper, sm80 on any
sm_80+ device), bf16 and fp16, weights row-major and column-major. The reference runs in fp64 on
the same low-precision inputs; the kernels accumulate in fp32 and round once, so the error is at
most half an ulp of the output plus fp32 accumulation noise: rtol = eps(dtype) and an atol of
eps(dtype) * sqrt(K) / 8 for a reduction of length K (outputs of unit-variance inputs grow like
sqrt(K)). A wrong tile, expert or offset gives errors of order sqrt(K), far outside.
"""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

import moe_kernels as mk
from moe_kernels.ops import _select as S
from moe_kernels.ops.grouped_mm import grouped_mm_dw_reference, grouped_mm_reference

# The module (moe_kernels.ops re-exports a function of the same name).
G = importlib.import_module("moe_kernels.ops.grouped_mm")
gpu = pytest.mark.gpu


def sizes_with_empty(E, high, seed, empty_every=4):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, high, (E,), generator=g).tolist()
    return [0 if i % empty_every == 1 else s for i, s in enumerate(sizes)]


CASES = [
    # (sizes, D, F, padding rows)
    ([300], 64, 128, 0),  # E = 1
    ([5, 0, 700, 129, 0, 64, 1, 256], 256, 512, 37),  # E = 8, empty experts, padding rows
    (sizes_with_empty(64, 300, seed=1), 128, 64, 5),  # E = 64, a quarter of them empty
    (sizes_with_empty(256, 40, seed=2), 64, 256, 0),  # E = 256, small groups (< one tile)
    ([0] * 7 + [3000] + [0] * 8, 512, 256, 0),  # all rows to one expert
    ([4096, 1, 2500, 129], 1024, 384, 11),  # thousands of rows per expert, F = 3 tiles
    ([17, 0, 130], 72, 40, 3),  # D, F multiples of 8 but not of any tile size
    ([0, 0, 0], 64, 64, 10),  # every expert empty: all rows are padding
]
IDS = ["E1", "E8", "E64", "E256", "one_expert", "thousands", "odd_dims", "all_empty"]
BACKWARD_CASES = [CASES[i] for i in (1, 2, 3, 4, 5)]
BACKWARD_IDS = [IDS[i] for i in (1, 2, 3, 4, 5)]


def tolerance(dtype, K):
    eps = torch.finfo(dtype).eps
    return {"rtol": eps, "atol": eps * math.sqrt(max(K, 1)) / 8}


def check(actual, expected, dtype, K, what):
    err = (actual.double() - expected).abs()
    if err.numel():
        print(f"{what} {dtype} K={K}: max err {err.max().item():.3e}, mean {err.mean().item():.3e}")
    torch.testing.assert_close(actual.double(), expected, **tolerance(dtype, K))


def offsets_of(sizes, dtype=torch.int32, device="cuda"):
    return torch.tensor([0, *itertools.accumulate(sizes)], dtype=dtype, device=device)


def make_inputs(sizes, D, F, pad, dtype, layout, seed=0):
    """x (N, D) and w (E, D, F) on the GPU; layout "col" gives w as a transposed view."""
    g = torch.Generator().manual_seed(seed)
    N, E = sum(sizes) + pad, len(sizes)
    x = torch.randn(N, D, generator=g).to(device="cuda", dtype=dtype)
    if layout == "row":
        w = torch.randn(E, D, F, generator=g).to(device="cuda", dtype=dtype)
    else:
        w = torch.randn(E, F, D, generator=g).to(device="cuda", dtype=dtype).transpose(1, 2)
    return x, w


def poison_allocator(numel, dtype):
    """Free a NaN-filled block of this size so that the next allocation likely reuses it: output
    regions a kernel forgets to write then show up as NaN instead of lucky zeros."""
    torch.full((numel,), float("nan"), dtype=dtype, device="cuda")


@pytest.fixture(params=[90, 80], ids=["sm90", "sm80"])
def arch(request, monkeypatch):
    """Run with the given kernel family where this device and build can run it."""
    cap = torch.cuda.get_device_capability()
    usable = {90: cap == (9, 0), 80: cap >= (8, 0)}[request.param]
    if not usable or request.param not in G._CUDA_GEMM_ARCHS:
        pytest.skip(f"sm{request.param} kernels cannot run on {cap} with this build")
    monkeypatch.setattr(G, "_kernel_arch", lambda device: request.param)
    return request.param


# ---- GPU: forward --------------------------------------------------------------------------


@gpu
def test_cuda_backend_is_chosen_for_bf16():
    # A CUDA build on an sm_80+ GPU must pick these kernels (not silently fall back).
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the CUTLASS kernels need compute capability 8.0 or later")
    assert S._C_HAS_CUDA and mk.build_info()["cutlass"], mk.build_info()
    x, w = make_inputs([4, 4], 64, 64, 0, torch.bfloat16, "row")
    assert S.select("grouped_mm", G.BACKENDS, None, x=x, w=w).name == "cuda"
    assert S.select("grouped_mm", G.BACKENDS, None, x=x, w=w.transpose(1, 2)).name == "cuda"


@gpu
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes,D,F,pad", CASES, ids=IDS)
def test_forward_matches_reference(arch, sizes, D, F, pad, dtype, layout):
    x, w = make_inputs(sizes, D, F, pad, dtype, layout, seed=len(sizes) + D)
    offs = offsets_of(sizes, torch.int64 if len(sizes) % 2 else torch.int32)
    poison_allocator(x.shape[0] * F, dtype)
    y = mk.grouped_mm(x, w, offs, backend="cuda")
    assert y.shape == (x.shape[0], F) and y.dtype == dtype
    check(y, grouped_mm_reference(x.double(), w.double(), offs), dtype, D, "y")
    assert torch.all(y[sum(sizes) :] == 0)  # padding rows are exactly zero


@gpu
def test_forward_no_rows(arch):
    # N = 0: nothing to compute, shapes still right; the backward gives zero weight gradients.
    x = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = mk.grouped_mm(x, w, torch.zeros(4, dtype=torch.int32, device="cuda"), backend="cuda")
    assert y.shape == (0, 32)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.all(w.grad == 0)


def shifted(t, by=3):
    """A copy of ``t`` with the same strides, starting ``by`` elements into its storage."""
    flat = torch.empty(t.numel() + by, device=t.device, dtype=t.dtype)
    flat[by:].copy_(t.contiguous().flatten())
    return flat[by:].view(t.contiguous().shape)


@gpu
@pytest.mark.parametrize("layout", ["row", "col"])
def test_misaligned_starts_are_copied(arch, layout):
    # x and w starting 3 elements (6 bytes) into their storage: TMA and cp.async need 16-byte
    # aligned addresses, so the backend copies them; dx and dw take the same route.
    sizes, D, F = [40, 0, 25], 64, 32
    x, w = make_inputs(sizes, D, F, 2, torch.bfloat16, layout)
    x_off = shifted(x).requires_grad_()
    w_off = shifted(w) if layout == "row" else shifted(w.transpose(1, 2)).transpose(1, 2)
    assert w_off.stride() == w.stride() and w_off.data_ptr() % 16
    w_off.requires_grad_()
    offs = offsets_of(sizes)
    y = mk.grouped_mm(x_off, w_off, offs, backend="cuda")
    check(y, grouped_mm_reference(x.double(), w.double(), offs), x.dtype, D, "y")
    dy = shifted(torch.randn_like(y))
    y.backward(dy)
    check(
        x_off.grad,
        grouped_mm_reference(dy.double(), w.double().transpose(1, 2), offs),
        x.dtype,
        F,
        "dx",
    )
    check(w_off.grad, grouped_mm_dw_reference(x.double(), dy.double(), offs), x.dtype, 40, "dw")


@gpu
def test_unsupported_inputs_fall_back_with_reasons():
    x, w = make_inputs([3, 5], 64, 64, 0, torch.float32, "row")
    offs = offsets_of([3, 5])
    with pytest.raises(S.NoBackendError, match=r"cuda: .*dtype torch.float32"):
        mk.grouped_mm(x, w, offs, backend="cuda")
    assert mk.grouped_mm(x, w, offs).shape == (8, 64)  # another backend takes it
    x, w = make_inputs([3, 5], 12, 64, 0, torch.bfloat16, "row")  # 24-byte rows
    with pytest.raises(S.NoBackendError, match="D and F must be multiples of 8"):
        mk.grouped_mm(x, w, offs, backend="cuda")


# ---- GPU: backward -------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("offs_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes,D,F,pad", BACKWARD_CASES, ids=BACKWARD_IDS)
def test_backward_matches_reference(arch, sizes, D, F, pad, dtype, layout, offs_dtype):
    x, w = make_inputs(sizes, D, F, pad, dtype, layout, seed=3 * D + F)
    x, w = x.requires_grad_(), w.detach().requires_grad_()
    dy = torch.randn(x.shape[0], F, generator=torch.Generator().manual_seed(5)).to(x)
    offs = offsets_of(sizes, offs_dtype)
    # dx = grouped_mm(dy, w^T) runs on the CUDA backend too (the other B layout).
    assert S.select("grouped_mm", G.BACKENDS, None, x=dy, w=w.transpose(1, 2)).name == "cuda"
    poison_allocator(w.numel(), dtype)
    mk.grouped_mm(x, w, offs, backend="cuda").backward(dy)
    wt = w.detach().double().transpose(1, 2)
    check(x.grad, grouped_mm_reference(dy.double(), wt, offs), dtype, F, "dx")
    dw_ref = grouped_mm_dw_reference(x.detach().double(), dy.double(), offs)
    check(w.grad, dw_ref, dtype, max(sizes), "dw")
    assert torch.all(x.grad[sum(sizes) :] == 0)  # padding rows get no gradient
    for e, n in enumerate(sizes):
        if n == 0:
            assert torch.all(w.grad[e] == 0), f"empty expert {e} must get an exactly zero dw"


@gpu
def test_weight_grad_op_directly(arch):
    # The dw op on its own, with padding rows that must not contribute (they hold large values).
    sizes, D, F = [100, 0, 7, 260], 128, 96
    x, _ = make_inputs(sizes, D, F, 9, torch.bfloat16, "row")
    x[sum(sizes) :] = 1e4
    dy = torch.randn(x.shape[0], F, generator=torch.Generator().manual_seed(2)).to(x)
    offs = offsets_of(sizes, torch.int64)
    dw = torch.ops.moe_kernels.grouped_mm_dw(x, dy, offs, "cuda")
    check(dw, grouped_mm_dw_reference(x.double(), dy.double(), offs), x.dtype, 260, "dw")


# ---- GPU: no host synchronisation, CUDA graphs ---------------------------------------------


@gpu
def test_forward_and_backward_do_not_synchronise(arch):
    sizes, D, F = [33, 0, 200, 7], 128, 64
    x, w = make_inputs(sizes, D, F, 4, torch.bfloat16, "row")
    x, w = x.requires_grad_(), w.requires_grad_()
    dy, offs = torch.randn_like(x[:, :F]), offsets_of(sizes)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising torch call raises
    try:
        mk.grouped_mm(x, w, offs, backend="cuda").backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    check(w.grad, grouped_mm_dw_reference(x.double(), dy.double(), offs), x.dtype, 200, "dw")


@gpu
@pytest.mark.parametrize("layout", ["row", "col"])
def test_cuda_graph_replays_with_new_offsets(arch, layout):
    # Capture forward + backward once, then replay with different group sizes (an expert empty
    # at capture gets rows, a full one becomes empty, the padding changes): the graph must read
    # the offsets on device at every replay.
    D, F, N = 128, 192, 700
    x, w = make_inputs([N // 4] * 4, D, F, 0, torch.bfloat16, layout, seed=11)
    x, w = x.requires_grad_(), w.detach().requires_grad_()
    dy = torch.randn(N, F, generator=torch.Generator().manual_seed(6)).to(x)
    offs = offsets_of([300, 0, 250, 100])  # 50 padding rows
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture
        for _ in range(2):
            x.grad = w.grad = None
            mk.grouped_mm(x, w, offs, backend="cuda").backward(dy)
    torch.cuda.current_stream().wait_stream(stream)
    x.grad = w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mk.grouped_mm(x, w, offs, backend="cuda")
        y.backward(dy)
    for sizes in ([0, 700, 0, 0], [10, 20, 0, 600], [0, 0, 0, 0]):
        offs.copy_(offsets_of(sizes))
        with torch.no_grad():
            x.normal_()
        graph.replay()
        check(
            y,
            grouped_mm_reference(x.detach().double(), w.detach().double(), offs),
            x.dtype,
            D,
            f"y {sizes}",
        )
        assert torch.all(y[sum(sizes) :] == 0)
        wt = w.detach().double().transpose(1, 2)
        check(x.grad, grouped_mm_reference(dy.double(), wt, offs), x.dtype, F, f"dx {sizes}")
        dw_ref = grouped_mm_dw_reference(x.detach().double(), dy.double(), offs)
        check(w.grad, dw_ref, x.dtype, max(max(sizes), 1), f"dw {sizes}")


@gpu
def test_opcheck_and_compile(arch):
    sizes, D, F = [5, 0, 11], 64, 32
    x, w = make_inputs(sizes, D, F, 2, torch.bfloat16, "row")
    offs = offsets_of(sizes)
    dy = torch.randn(x.shape[0], F, generator=torch.Generator().manual_seed(8)).to(x)
    args = (x.clone().requires_grad_(), w.clone().requires_grad_(), offs, "cuda")
    torch.library.opcheck(torch.ops.moe_kernels.grouped_mm.default, args)
    torch.library.opcheck(torch.ops.moe_kernels.grouped_mm_dw.default, (x, dy, offs, "cuda"))

    def f(x, w):  # default selection, traced by dynamo (metadata-only reasons)
        return (mk.grouped_mm(x, w, offs).float() * dy.float()).sum()

    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(xa, wa).backward()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    f(xb, wb).backward()
    assert torch.equal(xa.grad, xb.grad) and torch.equal(wa.grad, wb.grad)
    check(wa.grad, grouped_mm_dw_reference(x.double(), dy.double(), offs), x.dtype, 11, "dw")


# ---- CPU: selection reasons and the compiled entry points ----------------------------------


def test_declines_cpu_tensors_with_a_reason():
    x, w = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(2, 16, 16, dtype=torch.bfloat16)
    reasons = G.CudaGroupedMM().not_supported_reasons(x=x, w=w)
    assert any("needs CUDA tensors, got cpu" in r or "without CUDA" in r for r in reasons), reasons
    with pytest.raises(S.NoBackendError, match="cuda: "):
        mk.grouped_mm(x, w, torch.tensor([0, 4, 8]), backend="cuda")


def test_alignment_reasons_on_fake_cuda_tensors(monkeypatch):
    # Metadata-only checks, exercised on fake CUDA tensors (no GPU needed).
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(S, "_C_HAS_CUDA", True)
    monkeypatch.setattr(G, "_CUDA_GEMM_ARCHS", (80, 90))
    monkeypatch.setattr(G, "_kernel_arch", lambda device: 90)
    reasons = G.CudaGroupedMM().not_supported_reasons
    with FakeTensorMode():
        bf16 = {"dtype": torch.bfloat16, "device": "cuda"}
        x = torch.empty(32, 64, **bf16)
        assert reasons(x=x, w=torch.empty(4, 64, 32, **bf16)) == []
        assert reasons(x=x, w=torch.empty(4, 32, 64, **bf16).transpose(1, 2)) == []
        fp32 = reasons(x=x.float(), w=torch.empty(4, 64, 32, device="cuda"))
        assert any("dtype torch.float32" in r for r in fp32), fp32
        odd = reasons(x=torch.empty(32, 60, **bf16), w=torch.empty(4, 60, 32, **bf16))
        assert any("D and F must be multiples of 8" in r for r in odd), odd
        base = torch.empty(4 * 64 * 64 + 8, **bf16)
        strided = base.as_strided((4, 64, 32), (4096, 64, 2))  # no unit stride along D or F
        assert any("unit stride along D or F" in r for r in reasons(x=x, w=strided))
        padded = base.as_strided((4, 64, 32), (2304, 36, 1))  # leading dimension 36
        assert any("16-byte aligned TMA" in r for r in reasons(x=x, w=padded))


cutlass = pytest.mark.skipif(
    not G._CUDA_GEMM_ARCHS, reason="moe_kernels._C built without the CUTLASS grouped GEMM"
)


@cutlass
def test_workspace_query_needs_no_gpu():
    for arch in G._CUDA_GEMM_ARCHS:
        for kind in (0, 1, 2):
            small = S._C.grouped_mm_workspace_bytes(arch, kind, 1, 8, 64, 64, 132)
            large = S._C.grouped_mm_workspace_bytes(arch, kind, 3, 256, 64, 64, 132)
            assert 0 < small < large  # per-group arrays grow with E
    with pytest.raises(ValueError, match="dtype: grouped_mm CUDA kernels take bf16"):
        S._C.grouped_mm_workspace_bytes(G._CUDA_GEMM_ARCHS[0], 0, 0, 8, 64, 64, 132)
    with pytest.raises(ValueError, match="D: expected a positive multiple of 8"):
        S._C.grouped_mm_workspace_bytes(G._CUDA_GEMM_ARCHS[0], 0, 1, 8, 60, 64, 132)


@cutlass
def test_launcher_rejects_bad_arguments_before_touching_the_device():
    arch = G._CUDA_GEMM_ARCHS[0]
    good = dict(
        x=256,
        b=512,
        out=1024,
        offsets=64,
        i64=False,
        E=2,
        N=16,
        D=64,
        F=64,
        ldb=64,
        bstride=64 * 64,
        sms=1,
        ws=2048,
        ws_bytes=1 << 20,
        stream=0,
    )

    def call(**change):
        a = {**good, **change}
        S._C.grouped_mm_cuda(arch, a.pop("kind", 0), a.pop("dtype", 1), *a.values())

    with pytest.raises(ValueError, match="kind: expected 0"):
        call(kind=7)
    with pytest.raises(ValueError, match="x: expected a 16-byte aligned"):
        call(x=258)
    with pytest.raises(ValueError, match="ldb, b_group_stride: expected multiples of 8"):
        call(ldb=60)
    with pytest.raises(ValueError, match="E: expected 1..65535"):
        call(E=0)
    missing = {80, 90} - set(G._CUDA_GEMM_ARCHS)
    if missing:
        with pytest.raises(ValueError, match="were not compiled"):
            S._C.grouped_mm_cuda(missing.pop(), 0, 1, *good.values())
