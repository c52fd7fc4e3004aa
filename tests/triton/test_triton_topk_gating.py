"""Triton top-k gating against the plain-torch reference."""

import pytest
import torch
from triton_helpers import DEVICE, DTYPES, assert_close, requires_triton

import moe_kernels as mk
from moe_kernels.ops.topk_gating import topk_gating_reference

pytestmark = requires_triton

# (T, E, K): interpreter programs hold one token row; E is padded to a power of two.
SHAPES = [(9, 8, 2), (5, 7, 7), (6, 13, 1), (3, 40, 6)]  # K = E, K = 1, prime E, E > 32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,K", SHAPES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference(dtype, T, E, K, score, normalize):
    g = torch.Generator().manual_seed(T * E + K)
    logits = (2 * torch.randn(T, E, generator=g)).to(dtype).to(DEVICE)
    w, e = mk.topk_gating(logits, K, score=score, normalize=normalize, backend="triton")
    w_ref, e_ref = topk_gating_reference(logits, K, score, None, normalize)
    assert w.dtype == torch.float32 and e.dtype == torch.int32
    assert torch.equal(e, e_ref)  # selection on the logits themselves: exactly the reference's
    assert_close(w, w_ref, torch.float32, "weights")  # scores are computed in fp32 for any dtype


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_changes_selection_not_weights(score):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(11, 9, generator=g).to(DEVICE)
    bias = torch.randn(9, generator=g).to(DEVICE)
    w, e = mk.topk_gating(logits, 3, score=score, bias_E=bias, backend="triton")
    w_ref, e_ref = topk_gating_reference(logits, 3, score, bias)
    assert torch.equal(e, e_ref)
    assert_close(w, w_ref, torch.float32, "weights")
    _, e_nobias = mk.topk_gating(logits, 3, score=score, backend="triton")
    assert not torch.equal(e, e_nobias)  # this bias is large enough to move some choices


def test_ties_go_to_the_lower_index():
    # Equal logits in several places: the lower expert id comes first, as in the reference.
    logits = torch.tensor(
        [[1.0, 3.0, 3.0, 0.0, 3.0], [0.5, 0.5, 0.5, 0.5, 0.5], [2.0, -1.0, 2.0, 2.0, -1.0]]
    ).to(DEVICE)
    w, e = mk.topk_gating(logits, 3, backend="triton")
    assert e.cpu().tolist() == [[1, 2, 4], [0, 1, 2], [0, 2, 3]]
    w_ref, e_ref = topk_gating_reference(logits, 3)
    assert torch.equal(e, e_ref)
    assert_close(w, w_ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_backward_matches_reference(dtype, score):
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(7, 6, generator=g).to(dtype).to(DEVICE)
    dw = torch.randn(7, 3, generator=g).to(DEVICE)
    grads = []
    for backend in ("triton", "reference"):
        z = z0.clone().requires_grad_(True)
        w, _ = mk.topk_gating(z, 3, score=score, backend=backend)
        w.backward(dw)
        grads.append(z.grad)
    assert grads[0].dtype == dtype
    assert_close(grads[0], grads[1], dtype, "dlogits")


def test_empty_tokens():
    w, e = mk.topk_gating(torch.empty(0, 8, device=DEVICE), 2, backend="triton")
    assert w.shape == (0, 2) and e.shape == (0, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_flag_the_token(bad):
    # No host sync to raise: the token's weights are NaN and its expert ids -1 (as on CUDA);
    # the other tokens are unaffected.
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    logits[3, 1] = bad
    w, e = mk.topk_gating(logits.to(DEVICE), 2, backend="triton")
    assert torch.all(torch.isnan(w[3])) and torch.all(e[3] == -1)
    keep = [0, 1, 2, 4]
    w_ref, e_ref = topk_gating_reference(logits[keep], 2)
    assert torch.equal(e[keep].cpu(), e_ref)
    assert_close(w[keep], w_ref, torch.float32)
