"""The exact PyTorch scan against the token-by-token reference: outputs and every gradient."""

import pytest
import torch

from nnunet_segmamba.mamba import scan
from nnunet_segmamba.mamba.reference import selective_scan_reference


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result.double() - reference).norm() / reference.norm()).item()


def random_inputs(batch, dim, d_state, length, groups, seed=0):
    """float64 leaf tensors: u, delta, A, B, C, D, z, delta_bias (A < 0 as in Mamba)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, dim, length), (batch, dim, length), (dim, d_state), (batch, groups, d_state, length),
              (batch, groups, d_state, length), (dim,), (batch, dim, length), (dim,)]
    tensors = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    tensors[1] = tensors[1] * 0.5
    tensors[2] = -torch.rand(dim, d_state, generator=g, dtype=torch.float64) * 2 - 0.1
    return [t.requires_grad_() for t in tensors]


def run(fn, tensors):
    u, delta, A, B, C, D, z, bias = tensors
    return fn(u, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=True)


@pytest.mark.parametrize("batch,dim,d_state,length,groups", [
    (2, 4, 3, 7, 1),        # shorter than a chunk
    (1, 6, 4, 100, 2),      # not a multiple of the chunk; two groups of B/C
    (2, 8, 16, 1000, 1),    # chunks of chunks (two recursion levels)
    (1, 3, 2, 32 * 32 + 5, 3),
])
def test_matches_sequential_reference(batch, dim, d_state, length, groups):
    tensors = random_inputs(batch, dim, d_state, length, groups)
    reference = run(selective_scan_reference, tensors)
    grad_out = torch.randn_like(reference)
    reference_grads = torch.autograd.grad(reference, tensors, grad_out)

    fp32 = [t.detach().float().requires_grad_() for t in tensors]
    result = run(scan.selective_scan, fp32)
    grads = torch.autograd.grad(result, fp32, grad_out.float())

    assert result.dtype == torch.float32
    assert relative_error(result, reference) <= 1e-5
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    for name, grad, expected in zip(names, grads, reference_grads):
        assert relative_error(grad, expected) <= 1e-5, name


@pytest.mark.parametrize("tokens_per_block", [2, 70])  # token by token; chunks and a rest
def test_block_by_block_equals_one_block(monkeypatch, tokens_per_block):
    """Long inputs go through the states in blocks; the carries between blocks must be exact."""
    tensors = [t.detach().float() for t in random_inputs(2, 4, 3, 300, 1, seed=1)]
    whole = [t.clone().requires_grad_() for t in tensors]
    expected = run(scan.selective_scan, whole)
    expected_grads = torch.autograd.grad(expected.square().sum(), whole)

    monkeypatch.setitem(scan.BLOCK_ELEMENTS, "cpu", tokens_per_block * 2 * 4 * 3)  # batch * channels * d_state
    assert {e - s for s, e in scan._blocks(300, 2 * 4 * 3, torch.device("cpu"))[:-1]} == {tokens_per_block}
    blocked = [t.clone().requires_grad_() for t in tensors]
    result = run(scan.selective_scan, blocked)
    grads = torch.autograd.grad(result.square().sum(), blocked)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [1, 31, 32, 63, 64, 65, 2000, 40000])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("zero_start", [False, True])
def test_linear_recurrence_equals_loop(length, reverse, zero_start):
    """Shorter than two chunks, chunks and a rest, chunks of chunks; forwards and backwards; in place."""
    g = torch.Generator().manual_seed(length)
    a = torch.rand(length, 3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(length, 3, 5, generator=g, dtype=torch.float64)
    h0 = None if zero_start else torch.randn(3, 5, generator=g, dtype=torch.float64)
    expected, state = [None] * length, torch.zeros(3, 5, dtype=torch.float64) if zero_start else h0
    for t in reversed(range(length)) if reverse else range(length):
        state = a[t] * state + b[t]
        expected[t] = state
    states = b.clone()
    assert scan.linear_recurrence_(a, states, h0, reverse) is states
    torch.testing.assert_close(states, torch.stack(expected), rtol=1e-12, atol=1e-12)


def test_half_precision_inputs_return_their_dtype():
    tensors = [t.detach().float() for t in random_inputs(1, 4, 2, 50, 1)]
    u, delta, A, B, C, D, z, bias = tensors
    out = scan.selective_scan(u.bfloat16(), delta.bfloat16(), A, B.bfloat16(), C.bfloat16(), D, z.bfloat16(),
                              delta_bias=bias, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    expected = scan.selective_scan(u, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=True)
    assert relative_error(out.float(), expected.double()) < 2e-2
