"""Building blocks of the networks, each taking plain arguments (channels, kernel, stride, ConvOps)."""

from nnunet_segmamba.blocks.conv import ConvOps
from nnunet_segmamba.blocks.downsampling import HierarchicalScaleDownsampling, StridedConvDownsampling
from nnunet_segmamba.blocks.fue import FeatureUncertainty
from nnunet_segmamba.blocks.gsc import GatedSpatialConv
from nnunet_segmamba.blocks.hgcn import HGCNBlock, RecursiveGatedConv
from nnunet_segmamba.blocks.mamba_residual import ResidualMambaLayer
from nnunet_segmamba.blocks.tsmamba import TSMambaBlock

__all__ = ["ConvOps", "FeatureUncertainty", "GatedSpatialConv", "HGCNBlock", "HierarchicalScaleDownsampling",
           "RecursiveGatedConv", "ResidualMambaLayer", "StridedConvDownsampling", "TSMambaBlock"]
