import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_kernels as mk
from moe_kernels.ops.topk_gating import topk_gating_backward_reference, topk_gating_reference

from .util import CPU_BACKENDS, DTYPES, assert_close


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    "T,E,K",
    [
        (64, 8, 2),
        (1, 8, 1),  # T = 1, K = 1
        (33, 7, 7),  # prime E, K = E
        (128, 64, 8),
    ],
)
def test_matches_reference(backend, dtype, score, normalize, T, E, K):
    g = torch.Generator().manual_seed(T * 1000 + E)
    logits = torch.randn(T, E, generator=g).to(dtype)
    w, e = mk.topk_gating(logits, K, score=score, normalize=normalize, backend=backend)
    w_ref, e_ref = topk_gating_reference(logits, K, score, None, normalize)
    assert e.dtype == torch.int32 and e.shape == (T, K)
    assert torch.equal(e, e_ref)
    assert_close(w, w_ref, torch.float64 if dtype == torch.float64 else torch.float32, "weights")
    if normalize:
        assert_close(w.sum(-1), torch.ones(T, dtype=w.dtype), torch.float32, "sum")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ties_go_to_lower_index(backend):
    logits = torch.zeros(3, 6)
    logits[1, 4] = 1.0  # one winner, then a 5-way tie
    _, e = mk.topk_gating(logits, 3, backend=backend)
    assert e.tolist() == [[0, 1, 2], [4, 0, 1], [0, 1, 2]]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_changes_selection_not_weights(backend, score):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    w0, e0 = mk.topk_gating(logits, 1, score=score, normalize=False, backend=backend)
    w1, e1 = mk.topk_gating(logits, 1, score=score, bias_E=bias, normalize=False, backend=backend)
    assert e0.tolist() == [[0]] and e1.tolist() == [[3]]
    s = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    assert torch.allclose(w1[0, 0], s[0, 3])  # the weight is the unbiased score


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(backend, score, normalize):
    logits = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    logits.requires_grad_(True)
    fn = lambda z: mk.topk_gating(z, 3, score=score, normalize=normalize, backend=backend)[0]
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradgradcheck(backend):
    # Without a backward kernel the reference's plain-torch backward runs inline: it stays
    # differentiable, so second derivatives (gradient penalties) work.
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    fn = lambda z: mk.topk_gating(z, 2, score="softmax", backend=backend)[0]
    assert torch.autograd.gradgradcheck(fn, (logits,))


def test_backward_matches_autograd_of_reference():
    z = torch.randn(20, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
    w_ref = torch.softmax(z, -1)
    top = torch.topk(z.detach(), 2, -1).indices
    g = w_ref.gather(-1, top)
    (g / g.sum(-1, keepdim=True)).pow(2).sum().backward()
    w, e = mk.topk_gating(z.detach(), 2)
    manual = topk_gating_backward_reference(2 * w, z.detach(), e, "softmax", True)
    assert_close(manual, z.grad, torch.float32, "dlogits")


def test_empty_tokens():
    w, e = mk.topk_gating(torch.empty(0, 8), 2)  # T = 0 gives empty results, not an error
    assert w.shape == (0, 2) and e.shape == (0, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits(backend, bad):
    logits = torch.randn(5, 4)
    logits[3, 1] = bad
    with pytest.raises(ValueError, match="logits_TE.*finite.*token 3"):
        mk.topk_gating(logits, 2, backend=backend)


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= E = 8, got 9"):
        mk.topk_gating(x, 9)
    with pytest.raises(ValueError, match="k: expected 1 <= k"):
        mk.topk_gating(x, 0)
    with pytest.raises(TypeError, match="k: expected an int"):
        mk.topk_gating(x, 2.0)
    with pytest.raises(ValueError, match="score"):
        mk.topk_gating(x, 2, score="relu")
    with pytest.raises(TypeError, match="logits_TE: expected dtype"):
        mk.topk_gating(x.long(), 2)
    with pytest.raises(ValueError, match="logits_TE: expected 2 dimensions"):
        mk.topk_gating(x[None], 2)
    with pytest.raises(ValueError, match="bias_E: expected shape"):
        mk.topk_gating(x, 2, bias_E=torch.zeros(7))
    with pytest.raises(ValueError, match="logits_TE: expected a contiguous"):
        mk.topk_gating(torch.randn(8, 4).t(), 2)
    with pytest.raises(TypeError, match="logits_TE: expected a torch.Tensor"):
        mk.topk_gating([[1.0, 2.0]], 1)
    with pytest.raises(ValueError, match="backend: expected one of"):
        mk.topk_gating(x, 2, backend="nope")


def test_no_backend_error_lists_every_backend():
    with pytest.raises(mk.NoBackendError) as info:
        mk.topk_gating(torch.randn(4, 8).half(), 2, backend="cpu")
    assert "cpu: dtype torch.float16" in str(info.value)


def test_fp16_falls_back_to_reference():
    x = torch.randn(16, 8).half()
    w, e = mk.topk_gating(x, 2)
    w_ref, e_ref = topk_gating_reference(x, 2)
    assert torch.equal(e, e_ref) and torch.allclose(w, w_ref)


def test_opcheck():
    logits = torch.randn(12, 8, requires_grad=True)
    for backend in CPU_BACKENDS:
        for bias in (None, torch.rand(8)):
            torch.library.opcheck(
                torch.ops.moe_kernels.topk_gating.default,
                (logits, 2, "softmax", bias, True, backend),
            )


@settings(max_examples=200, deadline=None)
@given(
    T=st.integers(0, 40),
    E=st.integers(1, 20),
    data=st.data(),
    score=st.sampled_from(["softmax", "sigmoid"]),
    seed=st.integers(0, 2**16),
    bf16=st.booleans(),
)
def test_property_cpu_equals_reference(T, E, data, score, seed, bf16):
    K = data.draw(st.integers(1, E))
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    if bf16:
        logits = logits.bfloat16()
    w, e = mk.topk_gating(logits, K, score=score, backend="cpu")
    w_ref, e_ref = topk_gating_reference(logits, K, score)
    assert torch.equal(e, e_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=1e-5)
    # Distinct experts per token, all in range.
    if T:
        assert int(e.min()) >= 0 and int(e.max()) < E
        assert (e.sort(-1).values.diff(dim=-1) > 0).all() if K > 1 else True


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_bias_raises(backend, bad):
    # A NaN bias used to select experts 0 and 1 silently.
    bias = torch.zeros(4)
    bias[2] = bad
    with pytest.raises(
        ValueError, match=rf"bias_E: expected finite values, got bias_E\[2\] = -?{bad}"
    ):
        mk.topk_gating(torch.randn(4, 4), 2, bias_E=bias, backend=backend)


def test_non_finite_bias_flags_every_token_without_a_host_check():
    # The CUDA/Triton stand-in for the error (no host synchronisation), tested on CPU tensors.
    from moe_kernels.ops.topk_gating import _flag_all_if_not_finite

    w, e = mk.topk_gating(torch.randn(3, 4), 2)
    bias = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    fw, fe = _flag_all_if_not_finite(bias, w, e)
    assert torch.isnan(fw).all() and (fe == -1).all() and fe.dtype == torch.int32
    kw, ke = _flag_all_if_not_finite(torch.zeros(4), w, e)
    assert torch.equal(kw, w) and torch.equal(ke, e)
