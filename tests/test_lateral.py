"""Lateral labels: name pairs, the left-right axis from nnU-Net's readers, the swapping mirror transform and the
left-right equivariant network (unit level; the trainers and the stock CLI: test_lateral_trainer, test_e2e_cli)."""

import copy
import math

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_segmamba.lateral.axis import LateralAxisError, reader_axis, training_axis
from nnunet_segmamba.lateral.equivariant import make_left_right_equivariant
from nnunet_segmamba.lateral.mirroring import LateralMirroring, detect, requested_mode
from nnunet_segmamba.lateral.pairs import LateralLabelsError, channel_pairs, find_name_pairs, label_pairs
from nnunet_segmamba.lateral.transforms import LateralMirrorTransform
from nnunet_segmamba.networks.plans import build_network
from nnunet_segmamba.networks.segmamba import SegMambaV2
from tests import nnunet_plans

NAME_PAIRS = [  # label names -> the pairs found, (left, right) each
    (["kidney_left", "kidney_right"], [("kidney_left", "kidney_right")]),
    (["Left-Cerebral-White-Matter", "Right-Cerebral-White-Matter"],
     [("Left-Cerebral-White-Matter", "Right-Cerebral-White-Matter")]),
    (["lung_upper_lobe_right", "lung_upper_lobe_left"], [("lung_upper_lobe_left", "lung_upper_lobe_right")]),
    (["LeftKidney", "RightKidney"], [("LeftKidney", "RightKidney")]),
    (["kidneyL", "kidneyR"], [("kidneyL", "kidneyR")]),
    (["hippocampus_l", "hippocampus_r"], [("hippocampus_l", "hippocampus_r")]),
    (["L_hippocampus", "R_hippocampus"], [("L_hippocampus", "R_hippocampus")]),
    (["femur-lt", "femur-rt"], [("femur-lt", "femur-rt")]),
    (["Rt Femur", "Lt Femur"], [("Lt Femur", "Rt Femur")]),
    (["adrenal gland left", "adrenal gland right"], [("adrenal gland left", "adrenal gland right")]),
    (["KIDNEY_LEFT", "KIDNEY_RIGHT"], [("KIDNEY_LEFT", "KIDNEY_RIGHT")]),
    (["rib_left_1", "rib_right_1", "rib_left_2", "rib_right_2"], [("rib_left_1", "rib_right_1"),
                                                                  ("rib_left_2", "rib_right_2")]),
    (["iliac.artery.left", "iliac.artery.right", "aorta"], [("iliac.artery.left", "iliac.artery.right")]),
    # words that only contain the letters, different rests, one side only: no pairs
    (["cleft", "cright"], []), (["bright_spot", "bleft_spot"], []), (["leftover", "rightover"], []),
    (["kidney_left", "lung_right"], []), (["kidney_left", "liver"], []), (["lung_left", "lung_right_upper"], []),
    (["spleen", "liver", "tumor"], []),
]


@pytest.mark.parametrize("names, pairs", NAME_PAIRS)
def test_name_pairs(names, pairs):
    assert find_name_pairs(names) == pairs


def test_a_name_with_two_partners_asks_for_declared_pairs():
    with pytest.raises(LateralLabelsError, match="could pair with each of .*declare the pairs"):
        find_name_pairs(["kidney_left", "kidney_right", "Kidney-Right"])


def test_label_values_from_names_or_the_declared_key():
    labels = {"background": 0, "blob_left": 1, "blob_right": 2, "tube": 3}
    assert label_pairs({"labels": labels}) == [(1, 2)]
    renamed = {"background": 0, "a": 1, "b": 2, "tube": 3}
    assert label_pairs({"labels": renamed}) == []
    assert label_pairs({"labels": renamed, "lateral_pairs": [["a", "b"]]}) == [(1, 2)]
    assert label_pairs({"labels": renamed, "lateral_pairs": [[2, 1]]}) == [(2, 1)]
    assert label_pairs({"labels": labels, "lateral_pairs": []}) == []  # declared none: detection off
    with pytest.raises(LateralLabelsError, match="names 'c', which is not one of its labels"):
        label_pairs({"labels": renamed, "lateral_pairs": [["a", "c"]]})
    with pytest.raises(LateralLabelsError, match="each in one pair only"):
        label_pairs({"labels": renamed, "lateral_pairs": [[1, 2], [2, 3]]})
    with pytest.raises(LateralLabelsError, match="two labels"):
        label_pairs({"labels": renamed, "lateral_pairs": [[1, 2, 3]]})


def test_region_based_labels_map_regions_onto_their_mirror_images():
    labels = {"background": 0, "hemisphere_left": [1], "hemisphere_right": [2], "brain": [1, 2], "lesion": 3}
    pairs = label_pairs({"labels": labels, "regions_class_order": [1, 2, 3, 4]})
    assert pairs == [(1, 2)]
    assert channel_pairs(pairs, [(1,), (2,), (1, 2), 3]) == [(0, 1)]
    assert channel_pairs(pairs, None) == [(1, 2)]  # label-based: outputs are the labels
    with pytest.raises(LateralLabelsError, match=r"Region \[1, 3\] has no mirror-image region"):
        channel_pairs(pairs, [(1,), (2,), (1, 3)])
    with pytest.raises(LateralLabelsError, match="are sets of labels: declare"):
        label_pairs({"labels": {"background": 0, "lobes_left": [1, 2], "lobes_right": [3, 4]}})


# --- the left-right axis, through nnU-Net's readers -------------------------------------------------------------

def lateral_gradient_sitk(path, direction: np.ndarray, spacing, size_xyz=(7, 6, 5)) -> None:
    """An image whose value at each voxel is the voxel's physical x (left-right, LPS), written by SimpleITK."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in size_xyz), indexing="ij"), -1)  # (x, y, z, 3)
    x = (index * np.asarray(spacing)) @ direction[0]  # physical x = row 0 of direction @ (spacing * index)
    image = sitk.GetImageFromArray(x.transpose(2, 1, 0).astype(np.float32))
    image.SetSpacing(tuple(map(float, spacing)))
    image.SetDirection(tuple(direction.ravel()))
    sitk.WriteImage(image, str(path))


def varies_only_along(array: np.ndarray, axis: int) -> bool:
    return all((np.ptp(np.diff(array, axis=a)) == 0 and np.abs(np.diff(array, axis=a)).max() < 1e-4) != (a == axis)
               for a in range(array.ndim))


PERMUTED = [np.eye(3), np.diag([-1.0, 1, 1]), np.eye(3)[[1, 0, 2]], np.eye(3)[[2, 0, 1]] * [[1], [-1], [1]],
            np.eye(3)[[1, 2, 0]]]


@pytest.mark.parametrize("direction", PERMUTED, ids=["identity", "flipped_x", "swap_xy", "zxy_flipped", "yzx"])
def test_simpleitk_axis_follows_the_direction_matrix(tmp_path, direction):
    path = tmp_path / "case.mha"
    lateral_gradient_sitk(path, direction, (0.8, 0.9, 1.1))
    data, properties = SimpleITKIO().read_images([str(path)])
    axis = reader_axis(properties)
    assert varies_only_along(data[0], axis)


def test_anisotropic_spacing_moves_the_axis_with_transpose_forward(tmp_path):
    """The thick slices run along ITK's x here: nnU-Net's planner puts the largest spacing first
    (transpose_forward [2, 0, 1]), which moves the left-right axis of the training arrays."""
    direction = np.eye(3)[[1, 0, 2]]  # index axis j runs left-right: array axis 1
    path = tmp_path / "case.mha"
    lateral_gradient_sitk(path, direction, (3.0, 0.7, 0.7))
    data, properties = SimpleITKIO().read_images([str(path)])
    assert properties["spacing"] == [0.7, 0.7, 3.0]
    transpose_forward = [2, 0, 1]
    axis = training_axis({"case": properties}, transpose_forward)
    assert axis == 2 and varies_only_along(data[0].transpose(transpose_forward), axis)


AFFINES = {"RAS": np.eye(3), "LAS": np.diag([-1.0, 1, 1]), "PSR": np.eye(3)[[2, 0, 1]] * [[1], [-1], [1]],
           "SAL": np.eye(3)[[1, 2, 0]] * [[-1], [1], [1]]}


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_nibabel_readers_with_and_without_reorientation(tmp_path, orientation):
    rotation = AFFINES[orientation] * [0.8, 1.0, 1.3]
    affine = np.eye(4)
    affine[:3, :3] = rotation
    index = np.stack(np.meshgrid(*(np.arange(n) for n in (7, 6, 5)), indexing="ij"), -1)
    x = (index @ rotation.T)[..., 0]  # RAS x of each voxel
    path = tmp_path / "case.nii.gz"
    nibabel.save(nibabel.Nifti1Image(x.astype(np.float32), affine), str(path))
    for reader in (NibabelIO(), NibabelIOWithReorient()):
        data, properties = reader.read_images([str(path)])
        axis = reader_axis(properties)
        assert varies_only_along(data[0], axis)
        if isinstance(reader, NibabelIOWithReorient):
            assert axis == 2  # RAS: x is the file's first axis, the array's last


def rotated_about_z(degrees: float) -> dict:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return {"sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "direction": tuple(direction.ravel()), "origin": (0, 0, 0)}}


def test_oblique_disagreeing_and_unknown_geometry_are_clear_errors():
    assert reader_axis(rotated_about_z(20)) == 2
    with pytest.raises(LateralAxisError, match="case_a: no image axis runs left-right .*45 degrees oblique.*declare"):
        reader_axis(rotated_about_z(45), "case_a")
    cases = {f"case_{i}": rotated_about_z(0) for i in range(3)} | {"case_x": rotated_about_z(90)}
    with pytest.raises(LateralAxisError, match=r"do not agree .*axis 2 in 3 \(e.g. case_0\); axis 1 in 1 \(e.g. "
                                               r"case_x\).*NibabelIOWithReorient.*left_right_axis"):
        training_axis(cases, [0, 1, 2])
    with pytest.raises(LateralAxisError, match="records no orientation"):
        reader_axis({"spacing": (999.0, 1.0, 1.0)})
    assert training_axis({"png": {"spacing": (999.0, 1.0, 1.0)}}, [0, 1, 2], declared=1) == 1  # declared wins
    with pytest.raises(LateralAxisError, match="No preprocessed cases"):
        training_axis({}, [0, 1, 2])


def test_detect_reads_cases_only_for_a_dataset_with_pairs_and_honours_the_mode(monkeypatch):
    def no_cases():
        raise AssertionError("read")

    labels = {"background": 0, "blob_left": 1, "blob_right": 2}
    as_read, transposed = {"transpose_forward": [0, 1, 2]}, {"transpose_forward": [2, 0, 1]}
    assert detect({"labels": {"background": 0, "a": 1}}, as_read, no_cases, None, "swap") is None
    assert detect({"labels": labels}, as_read, no_cases, None, "off") is None
    cases = {"c": rotated_about_z(0)}
    assert detect({"labels": labels}, transposed, lambda: cases, None, "swap") == LateralMirroring(
        "swap", 0, ((1, 2),), ((1, 2),))
    assert detect({"labels": labels}, as_read, lambda: cases, None, "exclude").channel_pairs == ()
    monkeypatch.setenv("NNUNET_SEGMAMBA_LATERAL", "Exclude")
    assert requested_mode() == "exclude" and requested_mode("swap") == "swap"
    monkeypatch.setenv("NNUNET_SEGMAMBA_LATERAL", "mirror")
    with pytest.raises(ValueError, match="NNUNET_SEGMAMBA_LATERAL='mirror': expected one of swap, exclude, off"):
        requested_mode()


def test_2d_configurations_see_the_axis_one_lower_or_not_at_all():
    assert LateralMirroring("swap", 2, ((1, 2),)).patch_axis(2) == 1
    assert LateralMirroring("swap", 0, ((1, 2),)).patch_axis(2) is None
    assert LateralMirroring("swap", 0, ((1, 2),)).patch_axis(3) == 0
    assert LateralMirroring("swap", 2, ((1, 2),)).describe(3) == "lateral pairs: 1<->2 on axis 2 (swap)"


# --- training: the mirror transform ------------------------------------------------------------------------------

def test_a_flipped_sample_swaps_its_labels_only_when_flipped_left_right():
    image = torch.randn(2, 4, 5, 6)
    segmentation = torch.randint(-1, 4, (2, 4, 5, 6)).to(torch.int16)  # two channels (cascade), -1 padding
    lateral = LateralMirrorTransform((0, 1, 2), left_right_axis=2, label_pairs=[(1, 2)])
    plain = MirrorTransform((0, 1, 2))
    swap = torch.tensor([-1, 0, 2, 1, 3], dtype=torch.int16)
    seen = set()
    for seed in range(16):
        outputs = []
        for transform in (plain, lateral):
            torch.manual_seed(seed)
            outputs.append(transform(image=image.clone(), segmentation=segmentation.clone()))
        torch.manual_seed(seed)
        axes = tuple(plain.get_parameters()["axes"])
        seen.add(axes)
        assert torch.equal(outputs[0]["image"], outputs[1]["image"])  # same random axes, same flips
        expected = swap[outputs[0]["segmentation"].long() + 1] if 2 in axes else outputs[0]["segmentation"]
        assert torch.equal(outputs[1]["segmentation"], expected), axes
    assert {a for axes in seen for a in axes} == {0, 1, 2} and any(2 not in axes and axes for axes in seen)


# --- inference: the left-right equivariant network -----------------------------------------------------------------

@pytest.mark.parametrize("network_class", [PlainConvUNet, SegMambaV2], ids=["PlainConvUNet", "SegMambaV2"])
def test_equivariant_network_mirrors_exactly_and_keeps_its_state_dict(network_class):
    configuration = nnunet_plans.configuration([16, 16, 16], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4,
                                               [4, 8, 16, 16])
    torch.manual_seed(0)
    plain = build_network(network_class, configuration, 1, 4, False) if network_class is SegMambaV2 else \
        get_network_from_plans(nnunet_plans.PLAIN, configuration.network_arch_init_kwargs,
                               configuration.network_arch_init_kwargs_req_import, 1, 4, deep_supervision=False)
    network = copy.deepcopy(plain)
    make_left_right_equivariant(network, flip_dim=4, channels=4, channel_pairs=[(1, 2)])
    assert isinstance(network, network_class)
    assert network.state_dict().keys() == plain.state_dict().keys()  # checkpoints load both ways
    network.load_state_dict(plain.state_dict())
    network.eval(), plain.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        prediction, of_flipped = network(x), network(torch.flip(x, (4,)))
        expected = (plain(x) + torch.flip(plain(torch.flip(x, (4,))), (4,))[:, [0, 2, 1, 3]]) / 2
    assert torch.equal(of_flipped, torch.flip(prediction, (4,))[:, [0, 2, 1, 3]])  # exact, for any weights
    torch.testing.assert_close(prediction, expected)
    network.train(), plain.train()
    torch.manual_seed(1)
    with torch.no_grad():
        torch.testing.assert_close(network(x), plain(x))  # training runs the network alone
