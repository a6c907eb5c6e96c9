"""The Triton selective scan against the exact PyTorch scan: output and every gradient.

Runs on CPU tensors through Triton's interpreter: without a GPU, conftest.py sets TRITON_INTERPRET=1 before
anything imports triton (nnU-Net's imports do), since triton decides at import and decoration time whether
its functions are interpreted. On a machine with a GPU this module is skipped: `test_cuda.py` runs the
compiled kernels against the same scan.
"""

import ast
import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("GPU machine: test_cuda.py tests the compiled kernels", allow_module_level=True)
pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from nnunet_segmamba.mamba import scan, triton_scan  # noqa: E402
from tests.triton_compiler import compile_without_gpu  # noqa: E402


def test_kernels_run_in_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1" and isinstance(triton_scan._forward_kernel, InterpretedFunction)


NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def random_inputs(batch, dim, d_state, length, groups, dtype=torch.float32, seed=0):
    """Leaf tensors u, delta, A, B, C, D, z, delta_bias; B, C 3-d when groups is None.

    A < 0 and delta > 0 as in Mamba: exp(delta A) <= 1, where the PyTorch scan is exact.
    """
    g = torch.Generator().manual_seed(seed)
    bc = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    shapes = [(batch, dim, length), (batch, dim, length), (dim, d_state), bc, bc, (dim,), (batch, dim, length), (dim,)]
    tensors = [torch.randn(s, generator=g) for s in shapes]
    tensors[1] = tensors[1].abs() * 0.5
    tensors[2] = -torch.rand(dim, d_state, generator=g) * 2 - 0.1
    return [t.to(dtype).requires_grad_() for t in tensors]


def compare(tensors, options, tolerance):
    """Forward output and the gradients of every input that takes part, Triton vs PyTorch."""
    u, delta, A, B, C, D, z, bias = tensors
    kwargs = dict(D=D, z=z, delta_bias=bias) if options else {}
    used = tensors if options else tensors[:5]
    results = []
    for fn in (scan.selective_scan, triton_scan.triton_selective_scan):
        out = fn(u, delta, A, B, C, **kwargs, delta_softplus=options)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        results.append((out, torch.autograd.grad(out, used, grad_out)))
    (expected, expected_grads), (out, grads) = results
    assert out.dtype == u.dtype
    torch.testing.assert_close(out, expected, **tolerance)
    for name, grad, expected_grad in zip(NAMES, grads, expected_grads):
        assert grad.dtype == expected_grad.dtype, name
        torch.testing.assert_close(grad, expected_grad, **tolerance, msg=lambda m, name=name: f"d{name}: {m}")


FP32 = dict(rtol=1e-4, atol=1e-4)
"""fp32 rounding: dA, dD, d(delta_bias) sum batch * L fp32 terms, in another order than the PyTorch scan."""


@pytest.mark.parametrize("batch,dim,d_state,length,groups,options", [
    (2, 6, 4, 37, 1, True),       # two chunks, the last one partial
    (2, 6, 5, 150, 1, False),     # five chunks, the last one partial; N not a power of two
    (2, 6, 4, 70, 3, True),       # three groups of B and C, three chunks
    (1, 4, 4, 64, 1, True),       # two full chunks: no tail tokens
    (2, 8, 16, 37, None, True),   # B, C given as (batch, N, L)
])
def test_matches_pytorch_scan(batch, dim, d_state, length, groups, options):
    compare(random_inputs(batch, dim, d_state, length, groups), options, FP32)


def test_several_channel_blocks_and_tiles(monkeypatch):
    """Channel blocks that split a group (the last one masked) and many short tiles; shorter than a tile."""
    monkeypatch.setattr(triton_scan, "BLOCK_D", 4)
    monkeypatch.setattr(triton_scan, "TILE", 2)
    monkeypatch.setattr(triton_scan, "TILES", 4)
    compare(random_inputs(2, 12, 4, 37, 2), True, FP32)  # 6 channels per group: blocks of 4 and 2
    compare(random_inputs(1, 12, 4, 1, 2), False, FP32)  # one token


def test_channel_blocks_add_db_dc_into_one_sum(monkeypatch):
    """dB and dC of 3 two-channel blocks per group added atomically into one fp32 sum, in parallel segments too."""
    monkeypatch.setattr(triton_scan, "BLOCK_D", 2)
    monkeypatch.setattr(triton_scan, "TILES", 2)
    monkeypatch.setattr(triton_scan, "MIN_SEGMENT_BLOCKS", 2)
    monkeypatch.setattr(triton_scan, "PROGRAMS_PER_SM", 64)
    tensors = random_inputs(2, 12, 4, 70, 2)
    grid, _ = triton_scan._launch_config(*(tensors[i].detach() for i in (0, 2, 3)))
    assert grid[1] == 3 and grid[2] > 1
    compare(tensors, True, FP32)


@pytest.mark.parametrize("groups,options", [(1, True), (2, False)])
def test_segments_scanned_in_parallel(monkeypatch, groups, options):
    """Sequences split into segments (summary pass, carry between segments, full pass; forward and
    backward), the last segment shorter: 10 blocks of 16 tokens in segments of 4, 4 and 2."""
    monkeypatch.setattr(triton_scan, "TILE", 4)
    monkeypatch.setattr(triton_scan, "TILES", 4)
    monkeypatch.setattr(triton_scan, "MIN_SEGMENT_BLOCKS", 3)
    monkeypatch.setattr(triton_scan, "PROGRAMS_PER_SM", 64)
    tensors = random_inputs(2, 8, 4, 155, groups)
    grid, sizes = triton_scan._launch_config(*(tensors[i].detach() for i in (0, 2, 3)))
    assert grid[2] == 3 and sizes["seg_blocks"] == 4 and sizes["n_blocks"] == 10
    compare(tensors, options, FP32)


def test_a_forward_without_backward_keeps_no_checkpoints(monkeypatch):
    """Inference (nnUNetv2_predict runs without grad), or inputs that need no gradient: the final pass writes no
    block start states (as many bytes as u in fp16) and gives the training forward's output bit for bit; with
    segments, so the summary pass runs too."""
    monkeypatch.setattr(triton_scan, "TILE", 4)
    monkeypatch.setattr(triton_scan, "TILES", 4)
    monkeypatch.setattr(triton_scan, "MIN_SEGMENT_BLOCKS", 3)
    monkeypatch.setattr(triton_scan, "PROGRAMS_PER_SM", 64)
    kernel, launches = triton_scan._forward_kernel, []

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((kwargs["SUMMARY"], kwargs["STARTS"]))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_scan, "_forward_kernel", Recorded())
    tensors = random_inputs(2, 8, 4, 155, 2)
    outputs = []
    for grad_mode, inputs in ((True, tensors), (False, tensors), (True, [t.detach() for t in tensors])):
        launches.clear()
        with torch.set_grad_enabled(grad_mode):
            outputs.append(triton_scan.triton_selective_scan(*inputs, delta_softplus=True))
        assert launches == [(True, False), (False, inputs is tensors and grad_mode)], (grad_mode, launches)
    assert outputs[0].requires_grad and not outputs[1].requires_grad and not outputs[2].requires_grad
    assert torch.equal(outputs[1], outputs[0].detach()) and torch.equal(outputs[2], outputs[1])


def test_token_major_inputs_run_without_copies():
    """(batch, dim, L) views of (batch, L, dim) tensors, and B, C likewise: same results, and the output and the
    gradients keep that layout (the kernels read and write it through strides)."""
    tensors = random_inputs(2, 6, 4, 37, 3)
    token_major = [t.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
                   if t.dim() > 2 else t for t in tensors]
    compare(token_major, True, FP32)
    u, delta, A, B, C, D, z, bias = token_major
    out = triton_scan.triton_selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    du, dB = torch.autograd.grad(out, (u, B), torch.ones_like(out))
    assert out.stride(1) == 1 and du.stride(1) == 1 and dB.stride(2) == 1


def test_bfloat16_inputs():
    """bf16 in, fp32 inside, bf16 out: the same up to bf16 rounding of the results."""
    compare(random_inputs(2, 6, 4, 37, 1, dtype=torch.bfloat16), True, dict(rtol=2e-2, atol=2e-2))


COMPILE_FOR_H100 = """
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nnunet_segmamba.mamba import triton_scan

meta = dict(device="meta")  # the launch sizes of a Mamba layer: 384 channels, d_state 16
_, sizes = triton_scan._launch_config(torch.empty(2, 384, 4096, **meta), torch.empty(384, 16, **meta),
                                      torch.empty(2, 1, 16, 4096, **meta))
blocks = {name: sizes[name] for name in ("TILE", "TILES", "BLOCK_D", "BLOCK_N")}
strides = triton_scan._strides(torch.empty(1, 1, 1, **meta), torch.empty(1, 1, 1, 1, **meta))
bf16 = {"u", "delta", "B", "C", "z", "out", "dout", "du", "ddelta", "dz"}  # A, D, bias, buffers: fp32
target, options = GPUTarget("cuda", 90, 32), dict(num_warps=triton_scan.NUM_WARPS)


shuffles = {}  # shfl.sync instructions in the PTX of each SUMMARY kernel: its scans move no data between lanes


def build(kernel, constexprs, integers):
    signature = {name: "constexpr" if name in constexprs else "i32" if name in integers
                 else "*bf16" if name in bf16 else "*fp32" for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=target, options=options)
    if constexprs.get("SUMMARY"):
        shuffles[kernel.__name__] = max(shuffles.get(kernel.__name__, 0), compiled.asm["ptx"].count("shfl.sync"))


for kernel, starts in ((triton_scan._forward_kernel, dict(STARTS=True)), (triton_scan._forward_kernel,
                       dict(STARTS=False)), (triton_scan._backward_kernel, {})):
    for summary in (True, False):
        for flags in (True, False):
            build(kernel, dict(SUMMARY=summary, HAS_D=flags, HAS_Z=flags, HAS_BIAS=flags, SOFTPLUS=flags,
                                 **starts, **blocks), {*sizes, *strides})
for reverse in (True, False):
    build(triton_scan._carry_kernel, dict(REVERSE=reverse, BLOCK_D=blocks["BLOCK_D"], BLOCK_N=blocks["BLOCK_N"]),
            {"dim", "d_state", "n_segments"})
print(shuffles)
"""


def test_kernels_compile_for_a_gpu():
    """The interpreter runs the kernels as Python; compiling them to an sm_90 cubin (no GPU needed) checks
    what it does not: the types of loop-carried values, constexpr branches, ptxas. And what makes them fast: the
    scans along the tokens stay inside each lane. The SUMMARY kernels hold no sums over channels, so their few
    shuffles are the sums over the states of a channel's two lanes; a reverse `tl.associative_scan` along the
    in-lane token axis made the backward's 326 (BENCHMARKS.md, "Tried and rejected")."""
    shuffles = ast.literal_eval(compile_without_gpu(COMPILE_FOR_H100).strip().splitlines()[-1])
    assert set(shuffles) == {"_forward_kernel", "_backward_kernel"}
    assert max(shuffles.values()) <= 32, shuffles


def test_static_profile_of_the_kernels_applies_register_caps_to_the_final_passes():
    """benchmarks/scan_static.py (no GPU): registers, the warps an SM then holds, and the instruction mix of each
    kernel for sm_90; a register cap bounds the final passes only."""
    script = ("import runpy, sys; sys.argv = ['scan_static', '--max-registers', '96', '168']; "
              "runpy.run_path('benchmarks/scan_static.py', run_name='__main__')")
    lines = compile_without_gpu(script).strip().splitlines()
    columns = lines[-5].split()
    rows = {" ".join(line.split()[:2]): dict(zip(columns[1:], map(int, line.split()[2:]))) for line in lines[-4:]}
    assert set(rows) == {"forward summary", "forward final", "backward summary", "backward final"}
    assert rows["forward final"]["regs"] <= 96 and rows["backward final"]["regs"] <= 168
    for name, row in rows.items():
        assert row["warps/SM"] == min(32, 65536 // (32 * -(-row["regs"] // 8) * 8)), name
        assert row["MUFU"] > 0 and row["LDG"] > 0 and row["convert"] >= row["in-loop"], name
        assert (row["RED"] > 0) == (name == "backward final"), name  # dB and dC: atomic adds


def token_parallel_experiment():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "scan_token_parallel", Path(__file__).parents[1] / "benchmarks" / "scan_token_parallel.py")
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    return experiment


def test_token_parallel_forward_experiment_matches_the_pytorch_scan():
    """benchmarks/scan_token_parallel.py (a token-parallel layout, a GPU experiment), forward alone: several
    chunks, a partial last one, two groups; fp32 and bf16 inputs."""
    experiment = token_parallel_experiment()
    for dtype, tolerance in ((torch.float32, FP32), (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))):
        u, delta, A, B, C, D, _, bias = (t.detach() for t in random_inputs(2, 8, 4, 37, 2, dtype))
        expected = scan.selective_scan(u.float(), delta.float(), A, B.float(), C.float(), D.float(),
                                       delta_bias=bias.float(), delta_softplus=True)
        out = experiment.token_parallel_forward(u, delta, A, B, C, D, bias, (16, 1, 2))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, **tolerance)
    with pytest.raises(ValueError, match="CHANNELS 3 must divide the 4 channels of a group"):
        experiment.token_parallel_forward(u, delta, A, B, C, D, bias, (16, 1, 3))


@pytest.mark.parametrize("channels", [1, 4])
def test_token_parallel_experiment_gradients_match_the_pytorch_scan(channels):
    """The experiment's scan, forward and backward, one and several channels per program: output and every
    gradient (u, delta, A, B, C, D, delta_bias) against the exact PyTorch scan, over several chunks with a partial
    last one."""
    experiment = token_parallel_experiment()
    u, delta, A, B, C, D, _, bias = random_inputs(2, 8, 4, 37, 2)
    leaves = [u, delta, A, B, C, D, bias]
    results = []
    for fn in (lambda *t: scan.selective_scan(*t[:6], delta_bias=t[6], delta_softplus=True),
               lambda *t: experiment.token_parallel_scan(*t, (16, 1, channels))):
        out = fn(*leaves)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        results.append((out, torch.autograd.grad(out, leaves, grad_out)))
    (expected, expected_grads), (out, grads) = results
    torch.testing.assert_close(out, expected, **FP32)
    for name, grad, expected_grad in zip(["u", "delta", "A", "B", "C", "D", "delta_bias"], grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **FP32, msg=lambda m, name=name: f"d{name}: {m}")


def test_token_parallel_experiment_compiles_for_the_h100():
    """The experiment's kernels through Triton's real compiler for sm_90 at every setting it measures (the
    interpreter above checks their values, not that they compile): `scan_token_parallel.py --static`."""
    script = ("import runpy, sys; sys.argv = ['scan_token_parallel', '--static']; "
              "runpy.run_path('benchmarks/scan_token_parallel.py', run_name='__main__')")
    lines = compile_without_gpu(script).strip().splitlines()
    columns = lines[1].split()
    rows = {" ".join(line.split()[:2]): dict(zip(columns[1:], map(int, line.split()[2:]))) for line in lines[2:]}
    assert {name.split()[0] for name in rows} == {"forward", "backward"} and len(rows) == 12
    for name, row in rows.items():
        assert 0 < row["regs"] <= 255 and row["warps/SM"] >= 8 and row["SHFL"] > 0, name  # scans across lanes
        assert (row["RED"] > 0) == name.startswith("backward"), name  # dB and dC: atomic adds
