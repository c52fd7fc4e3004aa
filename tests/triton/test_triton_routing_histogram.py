"""Triton routing histogram against the plain-torch reference."""

import pytest
import torch
from triton_helpers import DEVICE, assert_close, random_experts, requires_triton

import moe_kernels as mk
from moe_kernels.ops.routing_histogram import routing_histogram_reference

pytestmark = requires_triton


@pytest.mark.parametrize("T,K,G,E", [(37, 2, 3, 6), (5, 4, 1, 4), (1, 1, 2, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference_and_accumulates(T, K, G, E, weighted):
    g = torch.Generator().manual_seed(T + E)
    experts = random_experts(T, K, E, seed=T)
    experts[::5, 0] = -1  # dropped slots are skipped
    labels = torch.randint(-1, G, (T,), generator=g)  # -1: padding tokens are skipped
    weights = torch.rand(T, K, generator=g) if weighted else None
    out = torch.randint(0, 3, (G, E), generator=g)  # accumulates onto what is there
    out_w = torch.rand(G, E, generator=g) if weighted else None
    ref, ref_w = out.clone(), (out_w.clone() if weighted else None)

    dev = lambda t: None if t is None else t.to(DEVICE)
    out_d, out_w_d = dev(out), dev(out_w)
    for _ in range(2):  # twice: in-place accumulation across calls
        mk.routing_histogram(
            dev(experts), dev(labels), out_d, dev(weights), out_w_d, backend="triton"
        )
        routing_histogram_reference(experts, labels, ref, weights, ref_w)
    assert torch.equal(out_d.cpu(), ref)  # counts are exact
    if weighted:
        assert_close(out_w_d, ref_w, torch.float32, "weight sums")


def test_out_of_range_ids_are_skipped():
    # Cannot raise without a host sync: ids >= E and labels >= G are skipped, like padding.
    experts = torch.tensor([[0, 5], [1, 2]], dtype=torch.int32, device=DEVICE)
    labels = torch.tensor([0, 3], device=DEVICE)
    out = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)
    mk.routing_histogram(experts, labels, out, backend="triton")
    assert out.cpu().tolist() == [[1, 0, 0], [0, 0, 0]]


def test_empty_tokens():
    out = torch.ones(2, 3, dtype=torch.int64, device=DEVICE)
    mk.routing_histogram(
        torch.empty(0, 2, dtype=torch.int32, device=DEVICE),
        torch.empty(0, dtype=torch.int64, device=DEVICE),
        out,
        backend="triton",
    )
    assert torch.all(out == 1)
