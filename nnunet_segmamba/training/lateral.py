"""Left/right-aware mirroring for any nnU-Net trainer, and nnU-Net's own trainer with it."""

from __future__ import annotations

import json
import os
from typing import ClassVar

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_segmamba.lateral.axis import read_case_properties
from nnunet_segmamba.lateral.equivariant import make_left_right_equivariant
from nnunet_segmamba.lateral.mirroring import MODE_VARIABLE, PLANS_KEY, LateralMirroring, detect, requested_mode
from nnunet_segmamba.lateral.transforms import LateralMirrorTransform


class LateralMirroringMixin:
    """Put first in the bases of an nnU-Net trainer: datasets with lateral labels (kidney_left / kidney_right) are
    mirrored so that a flip keeps every label true.

    In `initialize` the trainer detects the pairs (dataset.json) and the left-right axis (the preprocessed cases'
    geometry), logs them and stores them in the plans, which nnU-Net copies into the model folder for
    nnUNetv2_predict. Mode (a variant's `lateral_mode`, else $NNUNET_SEGMAMBA_LATERAL, else exclude): "exclude"
    drops the left-right axis from training and test-time mirroring. "swap" mirrors along every axis and swaps
    the paired labels of left-right-flipped samples; its network is left-right equivariant in inference
    (lateral.equivariant), so test-time mirroring along that axis happens inside it and leaves the predictor's
    axes. "off", or a dataset without pairs: nnU-Net's trainer unchanged.
    """

    lateral_mode: ClassVar[str | None] = None
    lateral: LateralMirroring | None = None

    def initialize(self) -> None:
        if not self.was_initialized:
            self.lateral = self._detect_lateral_mirroring()
            if self.lateral is None:
                self.plans_manager.plans.pop(PLANS_KEY, None)
            else:
                self._check_earlier_folds(self.lateral)
                self.plans_manager.plans[PLANS_KEY] = self.lateral.to_plans()
        super().initialize()

    def _detect_lateral_mirroring(self) -> LateralMirroring | None:
        mode = requested_mode(self.lateral_mode)
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        lateral = detect(self.dataset_json, self.plans_manager.plans,
                         lambda: read_case_properties(self.preprocessed_dataset_folder), regions, mode)
        dimension = len(self.configuration_manager.patch_size)
        if lateral is None:
            why = f"{MODE_VARIABLE}=off" if mode == "off" else "no lateral label pairs in dataset.json"
            self.print_to_log_file(f"Lateral mirroring: none ({why}): nnU-Net's mirroring")
            return None
        if lateral.mode == "swap" and self.is_cascaded:
            raise ValueError(f"{type(self).__name__}: swapping lateral labels is not implemented for cascaded "
                             f"configurations (their input holds the previous stage's labels); train this one with "
                             f"{MODE_VARIABLE}=exclude.")
        chosen = f"lateral_mode of {type(self).__name__}" if self.lateral_mode else f"{MODE_VARIABLE}=exclude|swap|off"
        self.print_to_log_file(f"{lateral.describe(dimension)}; mode from {chosen}")
        return lateral

    def _check_earlier_folds(self, lateral: LateralMirroring) -> None:
        """All folds of a model folder share its plans.json, which nnUNetv2_predict reads: they must agree."""
        path = os.path.join(self.output_folder_base, "plans.json")
        if not os.path.isfile(path):
            return
        with open(path) as file:
            earlier = LateralMirroring.from_plans(json.load(file))
        if earlier is not None and earlier != lateral:
            raise ValueError(f"{path} holds {earlier}, from an earlier fold; this run would train {lateral}. Folds of "
                             f"one model must mirror alike: use the earlier mode ({MODE_VARIABLE}={earlier.mode}) or "
                             f"another trainer name (e.g. a variant with lateral_mode).")

    def _lateral_patch_axis(self) -> int | None:
        if self.lateral is None:
            return None
        return self.lateral.patch_axis(len(self.configuration_manager.patch_size))

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        configured = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        rotation, dummy_2d, initial_patch_size, mirror_axes = configured
        axis = self._lateral_patch_axis()
        if axis is not None and axis in mirror_axes:
            others = tuple(a for a in mirror_axes if a != axis)
            self.inference_allowed_mirroring_axes = others or None  # swap: the network mirrors along `axis` itself
            if self.lateral.mode == "exclude":
                mirror_axes = others
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, *args,
                                **kwargs) -> BasicTransform:
        transforms = super().get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales,
                                                     mirror_axes, *args, **kwargs)
        axis = self._lateral_patch_axis()
        if self.lateral is not None and self.lateral.mode == "swap" and axis in (mirror_axes or ()):
            transforms.transforms = [
                LateralMirrorTransform(t.allowed_axes, axis, self.lateral.label_pairs) if type(t) is MirrorTransform
                else t for t in transforms.transforms]
        return transforms

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                     num_output_channels, enable_deep_supervision)
        lateral = LateralMirroring.from_plans(plans_manager.plans) if plans_manager is not None else None
        axis = lateral.patch_axis(len(configuration_manager.patch_size)) if lateral is not None else None
        if lateral is not None and lateral.mode == "swap" and axis is not None:
            make_left_right_equivariant(network, 2 + axis, num_output_channels, lateral.channel_pairs)
        return network


class nnUNetTrainerLateral(LateralMirroringMixin, nnUNetTrainer):
    """nnU-Net's trainer (any plans: default, ResEnc presets) with left/right-aware mirroring: the baseline that
    our trainers are compared with on datasets with lateral labels."""
