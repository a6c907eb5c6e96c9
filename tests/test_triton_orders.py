"""The Triton kernels that read a layer's token orders in place (`triton_orders`) against gathering copies:
outputs and every gradient. Without a GPU through Triton's interpreter (see test_triton_scan.py); on a GPU
with the compiled kernels."""

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from nnunet_segmamba.mamba import Mamba, layer, plane_orders, raster_order, tom_orders  # noqa: E402
from nnunet_segmamba.mamba.backends import TORCH_OPS  # noqa: E402
from nnunet_segmamba.mamba.triton_orders import BLOCK_C, BLOCK_L, ordered_conv1d_silu, sum_over_orders  # noqa: E402
from tests.triton_compiler import compile_without_gpu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [  # (orders, grid): L not a multiple of BLOCK_L, and one grid over several blocks of tokens
    (tom_orders(3), (3, 4, 5)), (plane_orders(3), (5, 3, 9)), (tom_orders(2), (6, 7)), (plane_orders(2), (2, 9)),
    ((raster_order(1),), (70,)),
]


gathered_conv1d_silu = TORCH_OPS.conv_in_orders  # the copies: TokenOrder.gather, torch.cat, F.conv1d
summed_scatters = TORCH_OPS.sum_orders  # the sum of TokenOrder.scatter


def gradients(fn, leaves, *args, seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(leaves[0], *args, *leaves[1:])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return [out, *torch.autograd.grad(out, leaves, grad)]


def assert_all_close(got, expected, **tolerance):
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        torch.testing.assert_close(g, e, **tolerance)


@pytest.mark.parametrize("orders,grid", CASES)
def test_ordered_conv1d_equals_gathering_then_convolving(orders, grid):
    length, channels = torch.Size(grid).numel(), BLOCK_C + 5
    g = torch.Generator().manual_seed(0)
    projected = torch.randn(2, length, 2 * channels, generator=g)  # x is in_proj's first half: a strided view
    rows = len(orders) * channels
    weight, bias = torch.randn(rows, 1, 4, generator=g), torch.randn(rows, generator=g)
    leaves = [t.to(DEVICE) for t in (projected, weight, bias)]

    def conv(fn):
        return lambda p, grid, orders, w, b: fn(p[..., :channels], grid, orders, w, b)
    got = gradients(conv(ordered_conv1d_silu), leaves, grid, orders)
    expected = gradients(conv(gathered_conv1d_silu), leaves, grid, orders)
    assert_all_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("orders,grid", CASES)
def test_sum_over_orders_equals_summed_scatters(orders, grid):
    length, channels = torch.Size(grid).numel(), 7
    y = torch.randn(2, len(orders) * channels, length, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    got, expected = (gradients(fn, [y], grid, orders) for fn in (sum_over_orders, summed_scatters))
    assert_all_close(got, expected, rtol=1e-6, atol=1e-6)


def test_half_precision_inputs_keep_their_dtype_and_accumulate_in_fp32():
    orders, grid, channels = plane_orders(3), (4, 4, BLOCK_L // 8), 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, torch.Size(grid).numel(), channels, generator=g)
    weight, bias = torch.randn(3 * channels, 1, 4, generator=g), torch.randn(3 * channels, generator=g)
    leaves = [t.to(DEVICE) for t in (x.bfloat16(), weight, bias)]
    got = gradients(ordered_conv1d_silu, leaves, grid, orders)
    expected = gradients(gathered_conv1d_silu, [leaves[0].float(), *leaves[1:]], grid, orders)
    assert [t.dtype for t in got] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    for t, e in zip(got, expected):  # bf16 rounding of the output and of d(output) only
        assert (t.float() - e).norm() < 1e-2 * e.norm()
    y = got[0]
    summed = sum_over_orders(y, grid, orders)
    assert summed.dtype == torch.bfloat16
    torch.testing.assert_close(summed.float(), summed_scatters(y.float(), grid, orders), rtol=1e-2, atol=1e-2)


def test_grid_results_are_rounded_once_by_the_kernels(monkeypatch):
    """The sum over orders and the conv1d's input gradient are fp32 sums that the last order's launch writes in
    the input's dtype: the fp32 sum rounded once (within a bf16 ulp: to nearest on a GPU, toward zero in Triton's
    interpreter; summing in bf16 is further off), and no fp32 (batch, L, C) result cast afterwards (a full-size
    read and write)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    orders, grid, channels = tom_orders(3), (3, 4, 5), 7
    length = torch.Size(grid).numel()
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape[-2:] == (length, channels):
                casts.append(func)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3 * channels, length, generator=g).bfloat16().to(DEVICE)
    x = torch.randn(2, length, channels, generator=g).bfloat16().to(DEVICE).requires_grad_()
    weight, bias = torch.randn(3 * channels, 1, 4, generator=g).to(DEVICE), torch.randn(3 * channels).to(DEVICE)
    with Casts():
        summed = sum_over_orders(y, grid, orders)
        (dx,) = torch.autograd.grad(ordered_conv1d_silu(x, grid, orders, weight, bias), x, y)
    assert casts == [] and summed.dtype == dx.dtype == torch.bfloat16
    (expected_dx,) = torch.autograd.grad(ordered_conv1d_silu(x.float(), grid, orders, weight, bias), x, y.float())
    for got, expected in ((summed, summed_scatters(y.float(), grid, orders)), (dx, expected_dx)):
        assert ((got.float() - expected).abs() <= expected.abs() * 2**-7).all()


def test_a_layer_with_the_triton_orders_equals_the_torch_backend(monkeypatch):
    """The layer's wiring of the two kernels: its output and gradients as with gathering copies."""
    in_place = dataclasses.replace(TORCH_OPS, ordered_conv1d_silu=ordered_conv1d_silu, sum_over_orders=sum_over_orders)
    torch.manual_seed(0)
    mamba = Mamba(12, d_state=4, orders=plane_orders(3), backend="torch").to(DEVICE)
    tokens = torch.randn(2, 3 * 4 * 5, 12, device=DEVICE, requires_grad=True)
    results = []
    for ops in (TORCH_OPS, in_place):
        monkeypatch.setattr(layer, "scan_ops", lambda device, backend: ops)
        out = mamba(tokens, (3, 4, 5))
        results.append([out, *torch.autograd.grad(out.square().sum(), [tokens, *mamba.parameters()])])
    assert_all_close(*results, rtol=1e-5, atol=1e-5)


COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nnunet_segmamba.mamba import triton_orders as k

pointers = {"x": "*bf16", "v": "*bf16", "out": "*bf16", "dout": "*bf16", "result": "*bf16"}  # the rest: fp32
for kernel, flags in ((k._into_order_kernel, ("HAS_WEIGHT", "HAS_BIAS", "SILU")),
                      (k._conv_backward_kernel, ("HAS_BIAS",)), (k._from_order_kernel, ("HAS_WEIGHT", "ACCUMULATE", "LAST"))):
    for on in (True, False):
        constexprs = dict(TAPS=4 if on else 1, BLOCK_L=k.BLOCK_L, BLOCK_C=k.BLOCK_C, **{f: on for f in flags})
        signature = {name: "constexpr" if name in constexprs else pointers.get(name, "*fp32")
                     if name in kernel.arg_names[:kernel.arg_names.index("length")] else "i32"
                     for name in kernel.arg_names}
        triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=k.NUM_WARPS))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests above compile them")
def test_kernels_compile_for_a_gpu():
    """Compiled to an sm_90 cubin without a GPU: what the interpreter does not check (types, constexpr branches)."""
    compile_without_gpu(COMPILE_FOR_H100)


def test_compiled_layers_gather_the_orders_instead(monkeypatch):
    """Under torch.compile the layer takes the gathering path (inductor fuses its copies), eager the kernels."""
    calls = []

    def counted(fn):
        return lambda *args: calls.append(fn.__name__) or fn(*args)
    in_place = dataclasses.replace(TORCH_OPS, ordered_conv1d_silu=counted(ordered_conv1d_silu),
                                   sum_over_orders=counted(sum_over_orders))
    monkeypatch.setattr(layer, "scan_ops", lambda device, backend: in_place)
    mamba, grid = Mamba(8, d_state=4, orders=tom_orders(2)).to(DEVICE), (3, 4)
    tokens = torch.randn(1, 12, 8, device=DEVICE)
    eager = mamba(tokens, grid)
    assert calls == ["ordered_conv1d_silu", "sum_over_orders"]
    torch._dynamo.reset()
    compiled = torch.compile(mamba, backend="eager")(tokens, grid)
    assert calls == ["ordered_conv1d_silu", "sum_over_orders"]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_launch_overhead_experiment_launches_what_it_times():
    """benchmarks/launch_overhead.py (a GPU experiment) times launches of these kernels: each row's launch runs
    with the arguments the kernels take now, and the order kernel's one gathers the order it claims."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "launch_overhead", Path(__file__).parents[1] / "benchmarks" / "launch_overhead.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    rows, x, tokens, gathered = experiment.launches(torch.device(DEVICE))
    written = []
    for launch in rows.values():
        launch()
        written.append(x[0].item())
    assert written == [1, 1 + 2, 1 + 24, 1 + 24] and x.tolist() == [25] * 64  # add_(1); a + b; a0 + a23; no x
    torch.testing.assert_close(gathered, tom_orders(3)[2].gather(tokens.reshape(1, 4, 4, 4, 16)))
