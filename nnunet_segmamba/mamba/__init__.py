"""Mamba layer and its scan backends (mamba-ssm's CUDA kernels, our Triton kernels, an exact PyTorch scan)."""

from nnunet_segmamba.mamba.backends import BACKEND_ENV, ScanOps, backend_for_compile, describe_backend, scan_ops
from nnunet_segmamba.mamba.layer import Mamba, TokenIdentity, use_backend
from nnunet_segmamba.mamba.orders import TokenOrder, plane_orders, raster_order, tom_orders
from nnunet_segmamba.mamba.scan import selective_scan

__all__ = [
    "BACKEND_ENV", "Mamba", "ScanOps", "TokenIdentity", "TokenOrder", "backend_for_compile", "describe_backend",
    "plane_orders", "raster_order", "scan_ops", "selective_scan", "tom_orders", "use_backend",
]
