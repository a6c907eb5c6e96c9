"""MambaClinix built from nnU-Net plans: shapes and deep supervision for every kind of configuration, where the
HGCN and Mamba stages are, the recursive gating, and the fp32 Mamba layer."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_segmamba.blocks.conv import ConvOps
from nnunet_segmamba.blocks.hgcn import ChannelLayerNorm, HGCNBlock, RecursiveGatedConv, gate_widths
from nnunet_segmamba.blocks.mamba_residual import ResidualMambaLayer
from nnunet_segmamba.networks.mambaclinix import MambaClinix
from nnunet_segmamba.networks.plans import build_network
from tests import nnunet_plans

LAYOUTS = {  # patch, strides, kernels, features (tiny) as nnU-Net plans them; small patches for the CPU
    "3d_fullres": ([64, 64, 64], [[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, [2, 4, 4, 8, 8, 8]),
    "3d_fullres_anisotropic": ([16, 64, 48], [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                               [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], [2, 4, 8, 8, 8]),
    "3d_lowres": ([48, 32, 64], [[1, 1, 1]] + [[2, 2, 2]] * 4, [[3, 3, 3]] * 5, [2, 4, 8, 8, 8]),
    "2d": ([256, 384], [[1, 1]] + [[2, 2]] * 7, [[3, 3]] * 8, [2, 4, 4, 8, 8, 8, 8, 8]),
}


def manager(name: str, resenc: bool = False) -> ConfigurationManager:
    """The default planner's configuration, or the ResEnc preset's (n_blocks_per_stage 1, 3, 2, 2, ...)."""
    if not resenc:
        return nnunet_plans.configuration(*LAYOUTS[name], batch_size=1)
    blocks = [1, 3] + [2] * (len(LAYOUTS[name][1]) - 2)
    return nnunet_plans.configuration(*LAYOUTS[name], network=nnunet_plans.RESENC, blocks=blocks, batch_size=1)


CASES = [(name, resenc) for name in LAYOUTS for resenc in (False, True) if (name, resenc) != ("3d_fullres", True)]


@pytest.mark.parametrize("name, resenc", CASES, ids=[f"{n}-{'resenc' if r else 'default'}_plans" for n, r in CASES])
def test_forward_backward_and_deep_supervision_shapes(name, resenc):
    torch.manual_seed(0)
    cm = manager(name, resenc)
    plans_before = copy.deepcopy(cm.configuration)
    network = build_network(MambaClinix, cm, 1, 3, deep_supervision=True)
    assert cm.configuration == plans_before  # no in-place edits of the plans

    x = torch.randn(1, 1, *cm.patch_size)  # batch size 1
    outputs = network(x)
    assert [tuple(o.shape) for o in outputs] == [(1, 3, *s) for s in nnunet_plans.deep_supervision_shapes(cm)]
    sum(o.square().mean() for o in outputs).backward()
    for name_, parameter in network.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name_

    network.decoder.deep_supervision = False  # as nnU-Net's predictor sets it
    with torch.no_grad():
        single = network(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, 3, *cm.patch_size)
    assert torch.allclose(single, outputs[0].detach(), atol=1e-5)


def test_plans_depth_is_residual_blocks_per_stage():
    default = build_network(MambaClinix, manager("3d_lowres"), 1, 2, deep_supervision=False)
    resenc = build_network(MambaClinix, manager("3d_lowres", resenc=True), 1, 2, deep_supervision=False)
    assert [len(stage[0].blocks) for stage in default.encoder.stages] == [1, 1, 1, 1, 1]  # 2 convs: one block
    assert [len(stage[0].blocks) for stage in resenc.encoder.stages] == [1, 3, 2, 2, 2]
    # the first block of a stage is strided by the plans' stride
    assert [list(stage[0].blocks[0].stride) for stage in default.encoder.stages] == LAYOUTS["3d_lowres"][1]
    cm = nnunet_plans.lowres()
    cm.configuration["architecture"]["arch_kwargs"]["n_conv_per_stage_decoder"] = [1, 2, 3, 4]
    decoder = build_network(MambaClinix, cm, 1, 2, deep_supervision=False).decoder
    assert [len(stage.merge.blocks) for stage in decoder.stages] == [1, 1, 2, 2]  # deepest first, as nnU-Net


@pytest.mark.parametrize("name, n_stages", [("3d_fullres", 6), ("3d_lowres", 5), ("2d", 8)])
def test_hgcn_on_the_first_half_of_the_stages_and_mamba_on_the_rest(name, n_stages):
    network = build_network(MambaClinix, manager(name), 1, 2, deep_supervision=True)
    n_hgcn = math.ceil(n_stages / 2)
    contexts = [stage[1] for stage in network.encoder.stages]
    assert network.encoder.mamba_stages == [s >= n_hgcn for s in range(n_stages)]
    assert all(isinstance(c, HGCNBlock) for c in contexts[:n_hgcn])
    assert all(isinstance(c, ResidualMambaLayer) for c in contexts[n_hgcn:])
    assert [c.gconv.order for c in contexts[:n_hgcn]] == [s + 2 for s in range(n_hgcn)]


def test_hgcn_stages_option_moves_the_mamba_stages():
    network = build_network(MambaClinix, manager("3d_lowres"), 1, 2, deep_supervision=True, hgcn_stages=1)
    assert network.encoder.mamba_stages == [False, True, True, True, True]
    assert isinstance(network.encoder.stages[1][1], ResidualMambaLayer)
    with pytest.raises(ValueError, match="hgcn_stages"):
        build_network(MambaClinix, manager("3d_lowres"), 1, 2, deep_supervision=True, hgcn_stages=6)


def test_stochastic_depth_grows_to_drop_path_rate():
    network = build_network(MambaClinix, manager("3d_fullres"), 1, 2, deep_supervision=True, drop_path_rate=0.3)
    rates = [stage[1].drop_path.drop_prob for stage in network.encoder.stages[:3]]
    assert rates == pytest.approx([0.1, 0.2, 0.3])


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_recursive_gating_multiplies(order):
    """Without biases g^n Conv is a homogeneous polynomial of degree n + 1: f(2x) = 2^(n+1) f(x).
    Gating by addition would make it linear (f(2x) = 2 f(x))."""
    torch.manual_seed(order)
    gconv = RecursiveGatedConv(16, order, [3, 3, 3], torch.nn.Conv3d).double()
    for module in gconv.modules():
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.zeros_(module.bias)
    x = torch.randn(1, 16, 5, 5, 5, dtype=torch.float64)
    assert torch.allclose(gconv(2 * x), 2 ** (order + 1) * gconv(x), rtol=1e-9, atol=1e-12)
    assert gate_widths(16, order) == [16 // 2 ** (order - 1 - k) for k in range(order)]


def test_gate_widths_never_reach_zero():
    assert gate_widths(2, 4) == [1, 1, 1, 2]
    with pytest.raises(ValueError, match="order"):
        gate_widths(8, 0)


def test_hgcn_block_keeps_shape_and_its_layer_scale_gates_the_gconv_branch():
    torch.manual_seed(0)
    ops = ConvOps(torch.nn.Conv2d, True, torch.nn.InstanceNorm2d, {"affine": True}, nonlin=torch.nn.LeakyReLU)
    block = HGCNBlock(8, [3, 3], order=3, ops=ops, layer_scale_init=0.0).eval()
    x = torch.randn(2, 8, 12, 10)
    assert block(x).shape == x.shape
    without_gconv = block(x)
    with torch.no_grad():
        block.layer_scale.fill_(1.0)
    assert not torch.allclose(block(x), without_gconv)


def test_channel_layer_norm_normalises_the_channels():
    norm = ChannelLayerNorm(6)
    x = 3 + 5 * torch.randn(2, 6, 4, 5, 3)
    y = norm(x)
    assert y.shape == x.shape
    assert torch.allclose(y.mean(1), torch.zeros(2, 4, 5, 3), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(2, 4, 5, 3), atol=1e-3)
    big = (300 * torch.randn(2, 6, 4, 4, 4)).half()  # its variance overflows fp16
    y = norm(big)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert torch.allclose(y.float(), norm(big.float()), atol=1e-2)


def channel_layer_norm_by_autograd(x, weight, bias, eps):
    """The formula, differentiated by autograd (what ChannelLayerNorm computed before its own backward)."""
    x32 = x.float()
    var, mean = torch.var_mean(x32, dim=1, keepdim=True, correction=0)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return ((x32 - mean) * torch.rsqrt(var + eps) * weight.view(shape) + bias.view(shape)).to(x.dtype)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_channel_layer_norm_backward_equals_autograds(dtype, tolerance):
    """The formula's forward (to rounding: on the CPU the statistics take two passes, not var_mean); gradients as
    autograd's of the formula, both near its float64 gradients."""
    torch.manual_seed(0)
    norm = ChannelLayerNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (2 + 3 * torch.randn(2, 6, 4, 5, 3)).to(dtype).requires_grad_()
    dy = torch.randn(2, 6, 4, 5, 3).to(dtype)
    ours = norm(x)
    by_autograd = channel_layer_norm_by_autograd(x, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(ours, by_autograd, atol=tolerance, rtol=tolerance)
    exact = [t.detach().double().requires_grad_() for t in (x, norm.weight, norm.bias)]
    var, mean = torch.var_mean(exact[0], dim=1, keepdim=True, correction=0)
    shape = (1, -1, 1, 1, 1)
    in_float64 = (exact[0] - mean) * torch.rsqrt(var + norm.eps) * exact[1].view(shape) + exact[2].view(shape)
    reference = torch.autograd.grad(in_float64, exact, dy.double())
    for got, autograds, want in zip(torch.autograd.grad(ours, (x, norm.weight, norm.bias), dy),
                                    torch.autograd.grad(by_autograd, (x, norm.weight, norm.bias), dy), reference):
        assert got.dtype == autograds.dtype
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, atol=tolerance * scale, rtol=tolerance)
        torch.testing.assert_close(got.double(), autograds.double(), atol=tolerance * scale, rtol=tolerance)


def test_channel_layer_norm_saves_x_and_statistics_only():
    norm, x = ChannelLayerNorm(8), torch.randn(2, 8, 6, 6, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x.half())
    feature_maps = [t for t in saved if t.ndim == 5 and t.shape[1] == 8]
    assert len(feature_maps) == 1 and feature_maps[0].dtype == torch.float16  # x itself, no fp32 copies


def test_mamba_layer_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    layer = ResidualMambaLayer(8)
    x = torch.randn(2, 8, 4, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    tokens = x.float().flatten(2).transpose(1, 2)  # out = t + Linear(LN(Mamba(LN(t)))), all fp32, then cast
    expected = tokens + layer.proj(layer.norm_out(layer.mamba(layer.norm_in(tokens))))
    assert torch.equal(y, expected.transpose(1, 2).reshape(x.shape).bfloat16())


def test_mamba_layer_is_residual_and_scans_in_raster_order():
    torch.manual_seed(0)
    layer = ResidualMambaLayer(4)
    x = torch.randn(1, 4, 3, 4, 5)
    with torch.no_grad():
        layer.proj.weight.zero_()
        layer.proj.bias.zero_()
        assert torch.equal(layer(x), x)  # out = x + Linear(...)
        layer.proj.weight.copy_(torch.eye(4))
        y = layer(x)
    # causal scan over raster order: changing the last voxel leaves all earlier voxels unchanged
    x2 = x.clone()
    x2[..., -1, -1, -1] += 1
    with torch.no_grad():
        y2 = layer(x2)
    assert torch.allclose(y2.flatten(2)[..., :-1], y.flatten(2)[..., :-1], atol=1e-6)
    assert not torch.allclose(y2.flatten(2)[..., -1], y.flatten(2)[..., -1], atol=1e-3)


def test_feature_map_size_counts_more_for_larger_patches_and_deep_supervision():
    network = build_network(MambaClinix, manager("3d_lowres"), 1, 2, deep_supervision=True)
    small, large = (network.compute_conv_feature_map_size(s) for s in ([48, 32, 64], [96, 64, 128]))
    assert isinstance(small, np.int64) and 7 * small < large <= 8 * small
    network.decoder.deep_supervision = False
    assert network.compute_conv_feature_map_size([48, 32, 64]) < small


def test_parameters_of_the_default_six_stage_plan():
    """nnU-Net's default 3d_fullres features, 4 in / 4 out: the size reported in the docs."""
    cm = nnunet_plans.configuration([128] * 3, [[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6,
                                    [32, 64, 128, 256, 320, 320])
    network = build_network(MambaClinix, cm, 4, 4, deep_supervision=True)
    assert sum(p.numel() for p in network.parameters()) == pytest.approx(43.35e6, rel=1e-3)  # released: 48.9 M
