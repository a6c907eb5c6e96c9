"""Choosing the scan backend: argument, environment variable, automatic fall-back, errors."""

import pytest
import torch
import torch._dynamo

from nnunet_segmamba.mamba import BACKEND_ENV, Mamba, backends, describe_backend, scan_ops, use_backend
from tests.dynamo import graph_breaks


@pytest.fixture(autouse=True)
def fresh_resolution(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    backends._CHOSEN.clear()
    yield
    backends._CHOSEN.clear()


CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)  # a device object only: scan_ops with GPU_OPS patched runs no CUDA call


def test_auto_on_cpu_is_the_exact_torch_scan():
    assert scan_ops(CPU).name == "torch"
    assert "torch" in describe_backend(CPU) and "requested: auto" in describe_backend(CPU)


def test_environment_variable_is_read(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert "requested: torch" in describe_backend(CPU)


def test_unknown_backend_names_its_source(monkeypatch):
    with pytest.raises(ValueError, match="environment variable NNUNET_SEGMAMBA_SCAN"):
        monkeypatch.setenv(BACKEND_ENV, "triton-ish")
        scan_ops(CPU)
    with pytest.raises(ValueError, match="backend argument"):
        Mamba(8, backend="fast")


def test_forcing_cuda_for_cpu_tensors_is_an_error(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(RuntimeError, match="'cuda' was requested"):
        Mamba(8)(torch.randn(1, 5, 8))


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    assert Mamba(8, backend="torch")(torch.randn(1, 5, 8)).shape == (1, 5, 8)


def test_failed_kernel_import_falls_back_with_one_warning(monkeypatch):
    """On a GPU whose kernels do not import (absent, or built for another torch) 'auto' warns once and
    runs the torch scan; a forced 'cuda' is an error that says how to fix it."""
    monkeypatch.setitem(backends.GPU_OPS, "cuda", lambda index: (None, "mamba-ssm could not be imported (test)"))
    monkeypatch.setitem(backends.GPU_OPS, "triton", lambda index: (None, "Triton could not be imported (test)"))
    with pytest.warns(UserWarning, match="mamba-ssm could not .* Triton could not .* using the exact PyTorch") as caught:
        assert scan_ops(GPU).name == "torch"
        assert scan_ops(GPU).name == "torch"
    assert len(caught) == 1
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation mamba-ssm"):
        backends._resolve("cuda", "cuda", 0)


def test_auto_without_mamba_ssm_takes_the_triton_scan(monkeypatch, recwarn):
    """A GPU machine without mamba-ssm (no nvcc to build it) runs our Triton kernels, silently."""
    triton = backends.ScanOps("triton", "test", backends.conv1d_silu_torch, backends.torch_selective_scan)
    monkeypatch.setitem(backends.GPU_OPS, "cuda", lambda index: (None, "mamba-ssm could not be imported (test)"))
    monkeypatch.setitem(backends.GPU_OPS, "triton", lambda index: (triton, ""))
    assert scan_ops(GPU) is triton
    assert not recwarn.list


def test_mamba_ssm_is_not_imported_on_cpu():
    import sys

    Mamba(8)(torch.randn(1, 5, 8))
    assert "mamba_ssm" not in sys.modules and "selective_scan_cuda" not in sys.modules


def test_triton_is_a_gpu_backend_with_its_own_fix(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="'triton' was requested, but the tensors are on cpu"):
        Mamba(8)(torch.randn(1, 5, 8))
    monkeypatch.setitem(backends.GPU_OPS, "triton", lambda index: (None, "Triton could not be imported (test)"))
    with pytest.raises(RuntimeError, match="Triton could not be imported .*torch build that ships Triton"):
        backends._resolve("triton", "cuda", 0)


def test_compiled_layers_read_the_choice_made_before_compiling(monkeypatch):
    """torch.compile traces the backend lookup: once made (our trainers log it before the first step), the
    choice is a dict read, without the imports and GPU self-test that break the graph (on a GPU machine without
    mamba-ssm: one 'Import failure' break per Mamba layer)."""
    def resolve_with_a_break(*key):
        torch._dynamo.graph_break()
        return backends.TORCH_OPS

    monkeypatch.setattr(backends, "_resolve", resolve_with_a_break)
    layer, tokens = Mamba(8), torch.randn(1, 5, 8)
    assert graph_breaks(layer, tokens)  # the lookup inside the graph: breaks
    scan_ops(CPU)
    assert graph_breaks(layer, tokens) == []


def test_compiled_networks_take_the_triton_scan_unless_one_was_asked_for(monkeypatch):
    """Under torch.compile `auto` means Triton (its kernels compile into the graph), where it runs; a backend
    named in NNUNET_SEGMAMBA_SCAN stays; use_backend reaches the layers through torch.compile's wrapper."""
    triton = backends.ScanOps("triton", "test", backends.conv1d_silu_torch, backends.torch_selective_scan)
    monkeypatch.setitem(backends.GPU_OPS, "triton", lambda index: (triton, ""))
    assert backends.backend_for_compile(GPU) == "triton"
    assert backends.backend_for_compile(CPU) is None
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    assert backends.backend_for_compile(GPU) is None
    monkeypatch.delenv(BACKEND_ENV)
    monkeypatch.setitem(backends.GPU_OPS, "triton", lambda index: (None, "Triton could not be imported (test)"))
    assert backends.backend_for_compile(GPU) is None

    network = torch.compile(torch.nn.Sequential(Mamba(8), torch.nn.Sequential(Mamba(8))))
    use_backend(network, "triton")
    assert [m.backend for m in network.modules() if isinstance(m, Mamba)] == ["triton", "triton"]


@pytest.mark.parametrize("with_bias", [True, False])
def test_shifted_conv_is_atens_causal_depthwise_conv(with_bias):
    """The triton backend's conv under torch.compile (shifted multiply-adds) against ATen's conv1d: values and
    gradients in fp32, and the input's dtype kept."""
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(2, 6, 37, generator=g), torch.randn(6, 1, 4, generator=g), torch.randn(6, generator=g)]
    results = []
    for conv in (backends.conv1d_silu_shifted, backends.conv1d_silu_torch):
        x, weight, bias = (t.clone().requires_grad_() for t in leaves)
        out = conv(x, weight, bias if with_bias else None)
        out.square().sum().backward()
        results.append([out, x.grad, weight.grad, bias.grad if with_bias else torch.zeros(())])
    for shifted, aten in zip(*results):
        torch.testing.assert_close(shifted, aten, rtol=1e-5, atol=1e-5)
    half = backends.conv1d_silu_shifted(leaves[0].bfloat16(), leaves[1], leaves[2] if with_bias else None)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), results[0][0].detach(), rtol=2e-2, atol=2e-2)
