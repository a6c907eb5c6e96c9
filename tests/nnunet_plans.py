"""nnU-Net plans configurations of the shapes the planner emits, with tiny feature counts for CPU tests.

Geometry (n_stages, strides, kernels, patch) follows what nnUNetv2_plan_experiment produces for such
data; only features_per_stage is shrunk.
"""

import numpy as np
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def configuration(patch_size, strides, kernel_sizes, features, network=PLAIN, blocks=None,
                  batch_size=2) -> ConfigurationManager:
    dim = len(patch_size)
    n_stages = len(strides)
    depth_key = "n_conv_per_stage" if network == PLAIN else "n_blocks_per_stage"
    arch_kwargs = {
        "n_stages": n_stages, "features_per_stage": features, "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
        "kernel_sizes": kernel_sizes, "strides": strides,
        depth_key: blocks or [2] * n_stages, "n_conv_per_stage_decoder": [2] * (n_stages - 1), "conv_bias": True,
        "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return ConfigurationManager({
        "data_identifier": "test", "preprocessor_name": "DefaultPreprocessor", "batch_size": batch_size,
        "patch_size": list(patch_size), "spacing": [1.0] * dim, "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False], "batch_dice": False,
        "architecture": {"network_class_name": network, "arch_kwargs": arch_kwargs,
                         "_kw_requires_import": REQUIRES_IMPORT},
    })


def iso(patch=64):
    """3d_fullres of an isotropic dataset (6 stages; a 128^3 patch in practice)."""
    return configuration([patch] * 3, [[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, [4, 8, 16, 24, 32, 32])


def anisotropic():
    """3d_fullres of thick-slice data: patch 40x224x192, in-plane-only first downsampling."""
    return configuration([40, 224, 192], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                         [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], [4, 8, 16, 24, 32, 32])


def lowres():
    """3d_lowres: a smaller, 5-stage patch."""
    return configuration([80, 96, 80], [[1, 1, 1]] + [[2, 2, 2]] * 4, [[3, 3, 3]] * 5, [4, 8, 16, 24, 32])


def two_d():
    """2d: 7 stages on a 256x192 slice."""
    return configuration([256, 192], [[1, 1]] + [[2, 2]] * 6, [[3, 3]] * 7, [4, 8, 16, 24, 32, 32, 32],
                         batch_size=12)


def patch_112():
    """3d_fullres for a 112^3 patch (5 stages), a size that breaks SegMamba's released code."""
    return configuration([112] * 3, [[1, 1, 1]] + [[2, 2, 2]] * 4, [[3, 3, 3]] * 5, [4, 8, 16, 24, 32])


def patch_96():
    """3d_fullres for a 96^3 patch (6 stages), where SegMamba's released code scans the wrong axis."""
    return configuration([96] * 3, [[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, [4, 8, 16, 24, 32, 32])


def resenc():
    """nnU-Net's ResEnc preset (n_blocks_per_stage), isotropic."""
    return configuration([64] * 3, [[1, 1, 1]] + [[2, 2, 2]] * 5, [[3, 3, 3]] * 6, [4, 8, 16, 24, 32, 32],
                         network=RESENC, blocks=[1, 3, 4, 6, 6, 6])


EXAMPLES = {"iso": iso, "anisotropic": anisotropic, "lowres": lowres, "2d": two_d, "96": patch_96,
            "112": patch_112, "resenc": resenc}


def deep_supervision_shapes(configuration: ConfigurationManager) -> list[tuple[int, ...]]:
    """Output shapes nnU-Net's targets have: patch * 1/cumprod(strides), all but the deepest
    (nnUNetTrainer._get_deep_supervision_scales)."""
    scales = 1 / np.cumprod(np.vstack(configuration.pool_op_kernel_sizes), axis=0)[:-1]
    return [tuple(int(round(p * s)) for p, s in zip(configuration.patch_size, scale)) for scale in scales]
