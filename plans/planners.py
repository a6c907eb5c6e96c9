"""nnU-Net experiment planners whose patch and batch sizes fit our networks' measured GPU memory.

nnU-Net's planner shrinks the patch until its estimate for PlainConvUNet fits the memory target, then grows the
batch into what is left. These planners run the same search with `memory.MemoryModel` for our network (fitted
to measured peaks) in place of nnU-Net's estimate, write plans that name our network class, and keep nnU-Net's
spacing, normalisation and resampling: 3d_fullres and 2d reuse nnU-Net's preprocessed data
(`nnUNetPlans_3d_fullres`, `nnUNetPlans_2d`) when its plans have the same spacing.
"""

from __future__ import annotations

import json
import math
import pydoc
from pathlib import Path
from typing import ClassVar

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.paths import nnUNet_preprocessed

from nnunet_segmamba.plans.memory import MemoryModel, load_calibration, network_sizes

DEFAULT_PLANS = "nnUNetPlans"


class MambaPlanner(ExperimentPlanner):
    """ExperimentPlanner for `network_class_name`, with its calibrated memory model."""

    network_class_name: ClassVar[str]
    family: ClassVar[str]
    """Short name used in the plans identifier: nnUNetPlans_<family>_<target>G."""

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str | None = None,
                 overwrite_target_spacing: list[float] | None = None, suppress_transpose: bool = False):
        plans_name = plans_name or default_plans_name(self.family, gpu_memory_target_in_gb)
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.UNet_class = pydoc.locate(self.network_class_name)  # nnU-Net writes its dotted name into the plans
        self.memory_model: MemoryModel = load_calibration()[self.network_class_name]
        self._input_channels = len(self.dataset_json["channel_names"])
        self._num_classes = len(self.dataset_json["labels"])

    def estimate_gib(self, patch_size, arch_kwargs: dict, requires_import, batch_size: int) -> float:
        """The memory model's peak (GiB) of a training step at this patch and batch."""
        activations, parameters = network_sizes(self.network_class_name, arch_kwargs, requires_import, patch_size,
                                                self._input_channels, self._num_classes)
        return self.memory_model.peak_gib(batch_size, activations, parameters)

    def static_estimate_VRAM_usage(self, patch_size, input_channels, output_channels, arch_class_name, arch_kwargs,
                                   arch_kwargs_req_import) -> float:
        """Our estimate at batch 2 in nnU-Net's units, so that its patch search (`estimate / ref_bs * 2 >
        reference`) shrinks the patch exactly while our estimate exceeds the target."""
        reference = self.UNet_reference_val_3d if len(patch_size) == 3 else self.UNet_reference_val_2d
        reference_batch = (self.UNet_reference_val_corresp_bs_3d if len(patch_size) == 3
                           else self.UNet_reference_val_corresp_bs_2d)
        gib = self.estimate_gib(patch_size, arch_kwargs, arch_kwargs_req_import, 2)
        if gib > self.UNet_vram_target_GB and min(patch_size) <= 2 * self.UNet_featuremap_min_edge_length:
            raise ValueError(f"A GPU memory target of {self.UNet_vram_target_GB:g} GiB is too small for "
                             f"{self.family}: even patch {[int(s) for s in patch_size]} at batch 2 needs ~{gib:.1f} GiB.")
        return gib * reference / self.UNet_reference_val_corresp_GB * reference_batch / 2

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        architecture = plan["architecture"]
        activations, parameters = network_sizes(self.network_class_name, architecture["arch_kwargs"],
                                                architecture["_kw_requires_import"], plan["patch_size"],
                                                self._input_channels, self._num_classes)
        # nnU-Net scales the batch in proportion to memory; ours has a fixed part (weights, optimizer state)
        fits = self.memory_model.max_batch_size(self.UNet_vram_target_GB, activations, parameters)
        five_percent = round(approximate_n_voxels_dataset * self.max_dataset_covered /
                             math.prod(int(s) for s in plan["patch_size"]))
        plan["batch_size"] = max(min(fits, five_percent), self.UNet_min_batch_size)
        plan["data_identifier"] = self._reusable_data_identifier(plan)
        return plan

    def _reusable_data_identifier(self, plan: dict) -> str:
        """nnU-Net's preprocessed data for the same spacing, if its default plans have it; else our own."""
        default = Path(nnUNet_preprocessed) / self.dataset_name / f"{DEFAULT_PLANS}.json"
        if not default.is_file():
            return plan["data_identifier"]
        for configuration in json.loads(default.read_text())["configurations"].values():
            if ("spacing" in configuration and configuration.get("data_identifier") and
                    [float(s) for s in configuration["spacing"]] == [float(s) for s in plan["spacing"]] and
                    configuration.get("normalization_schemes") == plan["normalization_schemes"]):
                return configuration["data_identifier"]
        return plan["data_identifier"]


def default_plans_name(family: str, target_gib: float) -> str:
    return f"{DEFAULT_PLANS}_{family}_{target_gib:g}G"


class SegMambaV2Planner(MambaPlanner):
    network_class_name = "nnunet_segmamba.networks.segmamba.SegMambaV2"
    family = "SegMambaV2"


class SegMambaPlanner(MambaPlanner):
    network_class_name = "nnunet_segmamba.networks.segmamba.SegMamba"
    family = "SegMamba"


class MambaClinixPlanner(MambaPlanner):
    network_class_name = "nnunet_segmamba.networks.mambaclinix.MambaClinix"
    family = "MambaClinix"


PLANNERS: dict[str, type[MambaPlanner]] = {p.family: p for p in (SegMambaV2Planner, SegMambaPlanner,
                                                                  MambaClinixPlanner)}
