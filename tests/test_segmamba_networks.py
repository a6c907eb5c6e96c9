"""SegMamba and SegMamba-V2 built from nnU-Net plans: shapes, deep supervision, gradients, plans errors."""

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_segmamba.blocks import HierarchicalScaleDownsampling, TSMambaBlock
from nnunet_segmamba.networks.plans import arch_kwargs, build_network
from nnunet_segmamba.networks.segmamba import SegMamba, SegMambaV2, mamba_stage_flags
from tests import nnunet_plans


def build(network_class, configuration, deep_supervision=True, **options):
    torch.manual_seed(0)
    return build_network(network_class, configuration, 2, 3, deep_supervision, **options)


@pytest.mark.parametrize("network_class", [SegMambaV2, SegMamba])
@pytest.mark.parametrize("example", ["iso", "anisotropic", "lowres", "2d", "96", "112", "resenc"])
def test_deep_supervision_outputs_match_nnunet_targets(network_class, example):
    """At the plans' own patch size, batch size 1."""
    configuration = nnunet_plans.EXAMPLES[example]()
    network = build(network_class, configuration)
    x = torch.randn(1, 2, *configuration.patch_size)
    with torch.no_grad():
        outputs = network(x)
        assert [tuple(o.shape[2:]) for o in outputs] == nnunet_plans.deep_supervision_shapes(configuration)
        assert all(o.shape[:2] == (1, 3) for o in outputs)
        network.decoder.deep_supervision = False
        single = network(x)
    assert isinstance(single, torch.Tensor) and tuple(single.shape) == (1, 3, *configuration.patch_size)


@pytest.mark.parametrize("network_class", [SegMambaV2, SegMamba])
@pytest.mark.parametrize("example", ["anisotropic", "2d", "resenc"])
def test_gradients_reach_every_mamba_parameter(network_class, example):
    """Backward at twice the total stride (the bottleneck needs > 1 voxel for instance norm)."""
    configuration = nnunet_plans.EXAMPLES[example]()
    network = build(network_class, configuration)
    patch = 2 * np.prod(configuration.pool_op_kernel_sizes, axis=0)
    outputs = network(torch.randn(1, 2, *patch))
    sum(o.mean() for o in outputs).backward()
    mamba_grads = [p.grad for n, p in network.named_parameters() if ".mixer." in n]
    assert mamba_grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in mamba_grads)


@pytest.mark.parametrize("network_class", [SegMambaV2, SegMamba])
def test_batch_of_two_at_an_odd_patch_multiple(network_class):
    configuration = nnunet_plans.configuration([48, 80, 112], [[1, 1, 1]] + [[2, 2, 2]] * 4, [[3, 3, 3]] * 5,
                                               [4, 8, 8, 16, 16])
    out = build(network_class, configuration, deep_supervision=False)(torch.randn(2, 2, 48, 80, 112))
    assert out.shape == (2, 3, 48, 80, 112)


def test_mamba_stages_default_to_one_eighth_resolution_for_v2_and_one_quarter_for_v1():
    iso = nnunet_plans.iso()
    assert build(SegMambaV2, iso).encoder.mamba_stages == [False, False, False, True, True, True]
    assert build(SegMamba, iso).encoder.mamba_stages == [False, False, True, True, True, True]
    # anisotropic: the largest axis decides (strides 1,2,2 / 2,2,2 ... -> in-plane 1/8 at stage 3)
    assert build(SegMambaV2, nnunet_plans.anisotropic()).encoder.mamba_stages == [False] * 3 + [True] * 3
    assert build(SegMambaV2, iso, mamba_downsampling=16).encoder.mamba_stages == [False] * 4 + [True] * 2
    assert mamba_stage_flags([[1, 1], [2, 2], [2, 2]], 1) == [True, True, True]


def test_v2_stages_are_hsd_then_tsmamba_blocks_with_plane_orders():
    network = build(SegMambaV2, nnunet_plans.iso())
    stage = network.encoder.stages[4]
    assert isinstance(stage[0], HierarchicalScaleDownsampling)
    assert [type(m) for m in stage[1:]] == [TSMambaBlock, TSMambaBlock]  # n_conv_per_stage = 2
    assert [o.axes for o in stage[1].mixer.orders] == [(0, 1, 2), (1, 0, 2), (2, 0, 1)]
    assert len(build(SegMamba, nnunet_plans.iso()).encoder.stages[4][1].mixer.orders) == 3


def test_resenc_depth_sets_blocks_per_stage():
    network = build(SegMambaV2, nnunet_plans.resenc())
    assert [len(stage) - 1 for stage in network.encoder.stages][1:] == [3, 4, 6, 6, 6]


def test_anisotropic_hsd_keeps_the_stride_one_axis():
    hsd = build(SegMambaV2, nnunet_plans.anisotropic()).encoder.stages[1][0]
    assert hsd.stride == (1, 2, 2)
    assert [tuple(b.kernel_size) for b in hsd.branches] == [(5, 5, 5), (3, 3, 3), (1, 2, 2)]
    assert hsd(torch.randn(1, 4, 5, 16, 12)).shape == (1, 8, 5, 8, 6)


def test_named_by_dotted_path_in_a_plans_file():
    """A plans file may name the network class directly; nnU-Net's own loader then builds it."""
    configuration = nnunet_plans.iso()
    network = get_network_from_plans("nnunet_segmamba.networks.segmamba.SegMambaV2",
                                     configuration.network_arch_init_kwargs,
                                     configuration.network_arch_init_kwargs_req_import, 2, 3, deep_supervision=True)
    assert isinstance(network, SegMambaV2) and network.decoder.deep_supervision


def test_feature_map_size_grows_with_the_patch_like_nnunets():
    configuration = nnunet_plans.iso()
    network = build(SegMambaV2, configuration)
    reference = PlainConvUNet(2, **{k: v for k, v in arch_kwargs(configuration).items() if k != "n_stages"},
                              n_stages=6, num_classes=3)
    small, large = network.compute_conv_feature_map_size([64] * 3), network.compute_conv_feature_map_size([128] * 3)
    assert large == 8 * small
    assert small > reference.compute_conv_feature_map_size([64] * 3)


def test_plans_errors_name_the_key():
    configuration = nnunet_plans.iso()
    configuration.configuration["architecture"]["arch_kwargs"]["kernel_sizes"] = [[3, 3, 3]] * 5
    with pytest.raises(ValueError, match="kernel_sizes has 5 entries but n_stages is 6"):
        build(SegMambaV2, configuration)
    configuration = nnunet_plans.iso()
    configuration.configuration["architecture"]["arch_kwargs"]["norm_op"] = "torch.nn.NoSuchNorm"
    with pytest.raises(ValueError, match="arch_kwargs.norm_op = 'torch.nn.NoSuchNorm' cannot be imported"):
        build(SegMambaV2, configuration)
    with pytest.raises(ValueError, match=r"SegMambaV2: architecture.arch_kwargs does not take \[.unknown_option.\]"):
        build(SegMambaV2, nnunet_plans.iso(), unknown_option=1)
    with pytest.raises(ValueError, match="SegMambaV2: input of spatial size .* is not divisible by the network's total stride"):
        build(SegMambaV2, nnunet_plans.iso())(torch.randn(1, 2, 64, 64, 48))
