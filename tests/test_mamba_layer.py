"""The Mamba layer: mamba_ssm's parameter layout, its equations, and scanning in several orders."""

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_segmamba.mamba import Mamba, TokenOrder, plane_orders, raster_order, tom_orders
from nnunet_segmamba.mamba.reference import selective_scan_reference


def mamba_ssm_layout(d_model, d_state=16, d_conv=4, expand=2):
    """Parameter names and shapes of mamba_ssm.Mamba (mamba-ssm 2.x, defaults bias=False, conv_bias=True)."""
    inner, rank = expand * d_model, math.ceil(d_model / 16)
    return {"A_log": (inner, d_state), "D": (inner,), "in_proj.weight": (2 * inner, d_model),
            "conv1d.weight": (inner, 1, d_conv), "conv1d.bias": (inner,), "x_proj.weight": (rank + 2 * d_state, inner),
            "dt_proj.weight": (inner, rank), "dt_proj.bias": (inner,), "out_proj.weight": (d_model, inner)}


@pytest.mark.parametrize("d_model,d_state", [(16, 16), (40, 8), (96, 16)])
def test_state_dict_layout_equals_mamba_ssm(d_model, d_state):
    layer = Mamba(d_model, d_state=d_state)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == mamba_ssm_layout(d_model, d_state)


def test_initialisation_follows_mamba():
    layer = Mamba(32, dt_min=0.001, dt_max=0.1)
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    torch.testing.assert_close(-torch.exp(layer.A_log[0]), -torch.arange(1.0, 17.0))
    assert torch.all(layer.D == 1)


def mamba_equations(layer: Mamba, tokens: torch.Tensor) -> torch.Tensor:
    """Mamba v1 written out (Gu & Dao 2023, Alg. 2 + Fig. 3), token-by-token scan, for one order."""
    length, inner, rank, n = tokens.shape[1], layer.d_inner, layer.dt_rank, layer.d_state
    x, z = (tokens @ layer.in_proj.weight.T).chunk(2, dim=-1)
    x = F.conv1d(x.transpose(1, 2), layer.conv1d.weight, layer.conv1d.bias, padding=layer.d_conv - 1, groups=inner)
    x = F.silu(x[..., :length])
    dt, B, C = (x.transpose(1, 2) @ layer.x_proj.weight.T).split([rank, n, n], dim=-1)
    y = selective_scan_reference(x, (dt @ layer.dt_proj.weight.T).transpose(1, 2), -torch.exp(layer.A_log),
                                 B.transpose(1, 2), C.transpose(1, 2), layer.D, z.transpose(1, 2),
                                 delta_bias=layer.dt_proj.bias, delta_softplus=True)
    return y.transpose(1, 2) @ layer.out_proj.weight.T


def test_single_order_layer_computes_mamba():
    torch.manual_seed(0)
    layer = Mamba(24, d_state=8).double()
    tokens = torch.randn(2, 70, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(tokens), mamba_equations(layer, tokens), rtol=1e-5, atol=1e-6)


def single_order_copy(layer: Mamba, k: int) -> Mamba:
    """Order k of a multi-order layer as a standalone single-order layer (shared projections copied)."""
    single = Mamba(layer.d_model, d_state=layer.d_state, d_conv=layer.d_conv).double()
    inner, per_order = layer.d_inner, layer.dt_rank + 2 * layer.d_state
    rows = slice(k * inner, (k + 1) * inner)
    with torch.no_grad():
        for name in ("in_proj.weight", "out_proj.weight"):
            single.get_parameter(name).copy_(layer.get_parameter(name))
        for name in ("conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D"):
            single.get_parameter(name).copy_(layer.get_parameter(name)[rows])
        single.x_proj.weight.copy_(layer.x_proj.weight[k * per_order:(k + 1) * per_order])
    return single


@pytest.mark.parametrize("orders,grid", [(tom_orders(3), (3, 4, 5)), (plane_orders(3), (4, 3, 5)),
                                         (plane_orders(2), (6, 7)), (tom_orders(2), (5, 6))])
def test_multi_order_layer_is_sum_of_single_order_scans(orders, grid):
    """Shared in/out projections, per-order SSM parameters, outputs summed: one kernel call does it all."""
    torch.manual_seed(1)
    layer = Mamba(16, d_state=4, orders=orders).double()
    tokens = torch.randn(2, math.prod(grid), 16, dtype=torch.float64)
    expected = 0
    for k, order in enumerate(orders):
        ordered = order.gather(tokens.reshape(2, *grid, 16)).transpose(1, 2)
        scanned = single_order_copy(layer, k)(ordered)
        expected = expected + order.scatter(scanned.transpose(1, 2), grid).reshape(2, -1, 16)
    torch.testing.assert_close(layer(tokens, grid), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("orders", [tom_orders(3), plane_orders(3), tom_orders(2), plane_orders(2)])
def test_orders_are_distinct_permutations(orders):
    grid = (3, 4, 5)[: len(orders[0].axes)]
    count = math.prod(grid)
    sequences = [order.positions(grid) for order in orders]
    for sequence in sequences:
        assert sorted(sequence) == list(range(count))
    assert len({tuple(s) for s in sequences}) == len(orders)
    tokens = torch.randn(2, *grid, 7)
    for order in orders:
        torch.testing.assert_close(order.scatter(order.gather(tokens), grid), tokens)


@pytest.mark.parametrize("orders,grid", [
    (tom_orders(3), (3, 4, 5)), (plane_orders(3), (2, 5, 3)), (tom_orders(2), (5, 6)), (plane_orders(2), (6, 5)),
    ((raster_order(1),), (7,)),
])
def test_walks_are_the_orders_as_index_arithmetic(orders, grid):
    """walk(step) is the grid index `gather` reads at each step."""
    steps = torch.arange(math.prod(grid))
    for order in orders:
        assert order.walk(grid)(steps).tolist() == order.positions(grid)


def test_walks_cover_at_most_three_axes():
    with pytest.raises(ValueError, match="1 to 3 axes"):
        TokenOrder((0, 1, 2, 3)).walk((2, 2, 2, 2))


def test_tom_inter_slice_walks_through_slices_first():
    depth, height, width = 4, 3, 5
    inter_slice = tom_orders(3)[2].positions((depth, height, width))
    assert inter_slice[:depth] == [d * height * width for d in range(depth)]
    assert inter_slice[depth] == 1
    assert tom_orders(3)[1].positions((depth, height, width)) == list(range(depth * height * width))[::-1]


def test_plane_orders_put_each_axis_outermost():
    grid = (2, 3, 4)
    for axis, order in enumerate(plane_orders(3)):
        sequence = order.positions(grid)
        block = math.prod(grid) // grid[axis]
        index = torch.arange(math.prod(grid)).reshape(grid)
        assert sorted(sequence[:block]) == sorted(index.select(axis, 0).flatten().tolist())


@pytest.mark.parametrize("orders,grid,voxel", [
    (plane_orders(3), (3, 4, 5), (2, 0, 0)), (tom_orders(3), (3, 4, 5), (1, 2, 0)),
    (plane_orders(2), (5, 6), (4, 0)), (tom_orders(2), (5, 6), (2, 3)),
])
def test_one_voxel_reaches_exactly_the_tokens_after_it_in_some_order(orders, grid, voxel):
    """The scan is causal in each order; the layer sums the orders. So a change at one voxel changes
    exactly the tokens that come at or after it in at least one order: every orientation is scanned."""
    torch.manual_seed(2)
    layer = Mamba(8, d_state=4, orders=orders)
    tokens = torch.randn(1, *grid, 8)
    changed = tokens.clone()
    changed[(0, *voxel)] += 1.0
    delta = (layer(changed.reshape(1, -1, 8), grid) - layer(tokens.reshape(1, -1, 8), grid)).abs().sum(-1)[0]

    flat = torch.arange(math.prod(grid)).reshape(grid)[voxel].item()
    expected = torch.zeros(math.prod(grid), dtype=torch.bool)
    for order in orders:
        sequence = order.positions(grid)
        expected[sequence[sequence.index(flat):]] = True
    assert torch.equal(delta > 0, expected)
    if not any(order.reverse for order in orders):  # voxels chosen so that some tokens stay unreached
        assert not expected.all()


def test_default_is_a_plain_sequence_layer():
    layer = Mamba(8)
    assert layer.orders == (raster_order(1),) == (TokenOrder((0,)),)
    out = layer(torch.randn(3, 17, 8))
    assert out.shape == (3, 17, 8)



def test_scan_inputs_are_not_copied_on_the_way(monkeypatch):
    """delta reaches the scan as the projection's result, (batch, K*inner, L) tokens contiguous, the layout the
    kernels read: no copy of a tensor that size between the conv1d and the scan (einsum's permuted result cost
    one, and its gradient another)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nnunet_segmamba.mamba import backends, layer as layer_module

    class FullSizeCopies(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.copies, self.scanned = numel, [], False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            copying = func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default)
            if copying and not self.scanned and out.numel() == self.numel:
                self.copies.append(str(func))
            return out

    def scan(u, delta, *args, **kwargs):
        mode.scanned = True
        assert delta.is_contiguous() and delta.shape == u.shape
        return backends.TORCH_OPS.selective_scan(u, delta, *args, **kwargs)

    ops = backends.ScanOps("recording", "the PyTorch scan after a check of its inputs",
                           backends.conv1d_silu_torch, scan)
    monkeypatch.setattr(layer_module, "scan_ops", lambda device, backend=None: ops)
    layer = Mamba(32, orders=tom_orders(3))
    mode = FullSizeCopies(2 * 3 * layer.d_inner * 60)
    with mode:
        layer(torch.randn(2, 60, 32), (3, 4, 5))
    assert mode.scanned and mode.copies == []
