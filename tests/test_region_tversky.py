"""Region-specific Tversky loss: hand-computed values, the region grid rule, deep supervision, the trainer's loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_segmamba.losses.region_tversky import (RegionTverskyLoss, ScaleWiseLoss, WeightedSumLoss,
                                                   deep_supervision_grids, region_grid, region_tversky_loss,
                                                   tversky_weights)
from nnunet_segmamba.training.mambaclinix import nnUNetTrainerMambaClinix, nnUNetTrainerMambaClinixRST
from tests import nnunet_plans

S = 1e-5


def logits_of(probs: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax over dim 1 is `probs`."""
    return probs.log()


def two_class_logits(foreground: list) -> torch.Tensor:
    """(1, 2, *spatial) logits of a background/foreground pair with the given foreground probabilities."""
    fg = torch.tensor(foreground, dtype=torch.float64)[None, None]
    return logits_of(torch.cat((1 - fg, fg), dim=1))


def tversky_by_hand(tp: float, fp: float, fn: float) -> float:
    alpha = 0.3 + 0.4 * (fp + S) / (fp + fn + S)
    beta = 0.3 + 0.4 * (fn + S) / (fp + fn + S)
    return (tp + S) / (tp + alpha * fp + beta * fn + S)


def test_perfect_prediction_gives_zero_also_for_an_absent_class():
    target = torch.tensor([[0, 1, 1, 0], [2, 2, 0, 0]])[None, None]  # (1, 1, 2, 4), class 3 absent
    logits = 1000.0 * torch.nn.functional.one_hot(target[:, 0], 4).movedim(-1, 1).float()
    assert RegionTverskyLoss((2, 2))(logits, target).item() == 0.0


def test_one_region_matches_the_formula_by_hand():
    # foreground probabilities and target on a 2 x 2 image, one region:
    # TP = (0.9 + 0.6 + 0.1) / 4 = 0.4, FP = 0.2 / 4 = 0.05, FN = (0.1 + 0.4 + 0.9) / 4 = 0.35
    # alpha ~ 0.3 + 0.4 * 0.125 = 0.35, beta ~ 0.3 + 0.4 * 0.875 = 0.65
    # T ~ 0.4 / (0.4 + 0.35 * 0.05 + 0.65 * 0.35) = 0.4 / 0.645
    logits = two_class_logits([[0.9, 0.2], [0.6, 0.1]])
    target = torch.tensor([[1, 0], [1, 1]])[None, None]
    loss = RegionTverskyLoss((1, 1))(logits, target).item()
    # background excluded: with it the loss would be the mean of this and the background's term
    assert loss == pytest.approx(1 - tversky_by_hand(0.4, 0.05, 0.35), abs=1e-6)
    assert loss == pytest.approx(1 - 0.4 / 0.645, abs=1e-4)


def test_regions_are_scored_separately_and_averaged():
    # two regions, the columns of the 2 x 2 image: left TP 0.75, FN 0.25; right TP 0, FP 0.1, FN 0.5
    logits = two_class_logits([[0.9, 0.2], [0.6, 1e-30]])
    target = torch.tensor([[1, 0], [1, 1]])[None, None]
    left, right = tversky_by_hand(0.75, 0.0, 0.25), tversky_by_hand(0.0, 0.1, 0.5)
    loss = RegionTverskyLoss((1, 2))(logits, target).item()
    assert loss == pytest.approx(1 - (left + right) / 2, abs=1e-6)
    assert loss != pytest.approx(RegionTverskyLoss((1, 1))(logits, target).item(), abs=1e-3)


def test_alpha_and_beta_stay_in_their_ranges():
    fp = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.3, 1e-7, 0.5])
    fn = torch.tensor([0.0, 1.0, 0.0, 1e-7, 0.3, 0.0, 0.5])
    alpha, beta = tversky_weights(fp, fn)
    for weight in (alpha, beta):
        assert (weight > 0.3).all() and (weight <= 0.7 + 1e-7).all()
    assert ((alpha + beta) > 1.0).all() and ((alpha + beta) <= 1.4 + 1e-7).all()
    assert alpha[0].item() == pytest.approx(0.7) and beta[0].item() == pytest.approx(0.7)  # no error: both A + B
    assert alpha[2].item() == pytest.approx(0.7, abs=1e-4) and beta[2].item() == pytest.approx(0.3, abs=1e-4)
    assert alpha[1].item() == pytest.approx(0.3, abs=1e-4) and beta[1].item() == pytest.approx(0.7, abs=1e-4)


def test_gradient_flows_to_the_logits():
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    RegionTverskyLoss((2, 2, 2))(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[:, 1:].abs().sum() > 0


def test_under_cpu_autocast_bf16_the_loss_is_fp32_and_matches():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 1)
    x = torch.randn(2, 2, 8, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    loss = RegionTverskyLoss((4, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        value = loss(logits, target)
    assert logits.dtype == torch.bfloat16 and value.dtype == torch.float32
    assert value.item() == pytest.approx(loss(logits.float(), target).item(), abs=1e-7)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())


def test_batch_with_an_absent_class():
    # class 2 appears in sample 1 only; sample 0 predicts no class 2: its class-2 regions score T = 1
    target = torch.tensor([[[0, 1, 1, 0]], [[2, 2, 1, 0]]])  # (2, 1, 4)
    probs = torch.tensor([[[0.8, 0.2, 0.2, 0.8], [0.2, 0.8, 0.8, 0.2], [0.0, 0.0, 0.0, 0.0]],
                          [[0.1, 0.1, 0.1, 0.9], [0.1, 0.1, 0.8, 0.1], [0.8, 0.8, 0.1, 0.0]]]) + 1e-30
    logits = logits_of(probs).requires_grad_()
    value = RegionTverskyLoss((1,))(logits, target)
    by_hand = [
        tversky_by_hand(0.4, 0.1, 0.1),  # sample 0, class 1
        1.0,  # sample 0, class 2: absent and not predicted
        tversky_by_hand(0.2, 0.075, 0.05),  # sample 1, class 1
        tversky_by_hand(0.4, 0.025, 0.1),  # sample 1, class 2
    ]
    assert value.item() == pytest.approx(1 - sum(by_hand) / 4, abs=1e-6)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_ignored_voxels_do_not_count():
    target = torch.tensor([[[1, 3, 0, 3]]])  # label 3 = ignore
    probs = torch.tensor([[[0.2, 0.5, 0.9, 0.1], [0.7, 0.2, 0.05, 0.8], [0.1, 0.3, 0.05, 0.1]]])
    other = probs.clone()
    other[0, :, 1], other[0, :, 3] = torch.tensor([0.1, 0.1, 0.8]), torch.tensor([0.9, 0.05, 0.05])
    loss = RegionTverskyLoss((1,), ignore_label=3)
    assert loss(logits_of(probs), target).item() == pytest.approx(loss(logits_of(other), target).item(), abs=1e-7)
    # as if the ignored voxels were not there (up to the smoothing: they still dilute the region's means)
    assert loss(logits_of(probs), target).item() == pytest.approx(
        RegionTverskyLoss((1,))(logits_of(probs[..., [0, 2]]), target[..., [0, 2]]).item(), abs=1e-4)


def test_errors_for_region_targets_one_class_and_a_grid_finer_than_the_output():
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="region-based"):
        RegionTverskyLoss((2, 2))(logits, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="at least one class"):
        RegionTverskyLoss((2, 2))(torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        RegionTverskyLoss((8, 2))(logits, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        RegionTverskyLoss((2, 2, 2))(logits, torch.zeros(1, 1, 4, 4))


def test_region_grid_follows_the_patch_size():
    assert region_grid([128, 128, 128]) == (16, 16, 16)
    assert region_grid([64, 64, 112]) == (8, 8, 14)
    assert region_grid([3, 20, 28, 512]) == (1, 3, 4, 64)  # halves round up
    assert region_grid([56, 40], region_size=4) == (14, 10)


def test_deep_supervision_grids_clamp_to_each_output():
    patch = [16, 64, 48]
    scales = [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25], [0.25, 0.0625, 0.0625]]
    grids = deep_supervision_grids(region_grid(patch), patch, scales)
    assert grids == [(2, 8, 6), (2, 8, 6), (2, 8, 6), (2, 4, 3)]
    for grid, scale in zip(grids, scales):
        assert all(g <= p * s for g, p, s in zip(grid, patch, scale))


def test_scale_wise_loss_weights_each_output_and_skips_zero_weights():
    outputs = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)]
    targets = [torch.randint(0, 2, (1, 1, *o.shape[2:])) for o in outputs]
    losses = [RegionTverskyLoss((4, 4)), RegionTverskyLoss((4, 4)), RegionTverskyLoss((4, 4))]  # last does not fit
    value = ScaleWiseLoss(losses, [0.6, 0.4, 0.0])(outputs, targets)
    expected = 0.6 * losses[0](outputs[0], targets[0]) + 0.4 * losses[1](outputs[1], targets[1])
    assert value.item() == pytest.approx(expected.item(), abs=1e-7)
    with pytest.raises(ValueError, match="2 weights"):
        ScaleWiseLoss(losses, [1.0, 1.0])


def test_region_tversky_loss_builds_one_grid_per_output():
    single = region_tversky_loss([64, 64, 112])
    assert isinstance(single, RegionTverskyLoss) and single.num_regions == (8, 8, 14)
    scaled = region_tversky_loss([64, 64, 64], [[1, 1, 1], [0.5] * 3, [0.125] * 3, [1 / 32] * 3], [0.5, 0.3, 0.2, 0])
    assert [loss.num_regions for loss in scaled.losses] == [(8, 8, 8), (8, 8, 8), (8, 8, 8), (2, 2, 2)]
    assert scaled.weights == (0.5, 0.3, 0.2, 0.0)


# the trainer's loss, built by nnU-Net's own code path ----------------------------------------------------------

CONFIGURATION = nnunet_plans.configuration([16, 32, 32], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
                                           [[1, 3, 3]] + [[3, 3, 3]] * 4, [2, 4, 4, 4, 4])


def trainer(cls: type, tmp_path, monkeypatch, labels: dict, regions_class_order: list | None = None):
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = {"dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans", "continue_training": False,
             "configurations": {"3d_fullres": copy.deepcopy(CONFIGURATION.configuration)}}
    dataset = {"labels": labels, "regions_class_order": regions_class_order}
    return cls(plans, "3d_fullres", 0, dataset, torch.device("cpu"))


def deep_supervision_batch(n_classes: int, n_labels: int):
    """Random logits and label maps (labels 0 .. n_labels - 1) at the deep-supervision outputs, batch 2."""
    torch.manual_seed(0)
    sizes = nnunet_plans.deep_supervision_shapes(CONFIGURATION)
    return ([torch.randn(2, n_classes, *s) for s in sizes],
            [torch.randint(0, n_labels, (2, 1, *s)).float() for s in sizes])


def test_rst_trainer_adds_08_rst_with_nnunets_weights_at_every_output(tmp_path, monkeypatch):
    labels = {"background": 0, "a": 1, "b": 2}
    rst_trainer = trainer(nnUNetTrainerMambaClinixRST, tmp_path / "rst", monkeypatch, labels)
    plain_trainer = trainer(nnUNetTrainerMambaClinix, tmp_path / "plain", monkeypatch, labels)
    rst_trainer.region_size = 2  # grid (8, 16, 16): clamped at the third output (8^3), which has a weight
    loss, dice_ce = rst_trainer._build_loss(), plain_trainer._build_loss()
    assert isinstance(dice_ce, DeepSupervisionWrapper) and isinstance(loss, WeightedSumLoss)
    weights = dice_ce.weight_factors  # nnU-Net's: 1/2^i, the last 0, normalised
    assert weights[-1] == 0 and math.isclose(sum(weights), 1.0)

    outputs, targets = deep_supervision_batch(3, 3)
    grids = [(8, 16, 16), (8, 16, 16), (8, 8, 8), (4, 4, 4)]  # outputs 16x32x32, 16^3, 8^3, 4^3
    rst = sum(w * RegionTverskyLoss(g)(o, t) for w, g, o, t in zip(weights, grids, outputs, targets))
    expected = dice_ce(outputs, targets) + 0.8 * rst
    assert loss(outputs, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_rst_trainer_without_deep_supervision_and_with_an_ignore_label(tmp_path, monkeypatch):
    rst_trainer = trainer(nnUNetTrainerMambaClinixRST, tmp_path, monkeypatch,
                          {"background": 0, "a": 1, "ignore": 2})
    rst_trainer.enable_deep_supervision = False
    loss = rst_trainer._build_loss()
    outputs, targets = deep_supervision_batch(2, 3)  # label 2 is the ignore label
    assert loss.losses[1].num_regions == (2, 4, 4) and loss.losses[1].ignore_label == 2
    assert torch.isfinite(loss(outputs[0], targets[0]))


def test_rst_trainer_refuses_region_based_labels(tmp_path, monkeypatch):
    regions = {"background": 0, "whole": [1, 2], "core": [2]}
    with pytest.raises(ValueError, match="region-based labels"):
        trainer(nnUNetTrainerMambaClinixRST, tmp_path, monkeypatch, regions, [1, 2])._build_loss()
    assert trainer(nnUNetTrainerMambaClinix, tmp_path, monkeypatch, regions, [1, 2])._build_loss() is not None
