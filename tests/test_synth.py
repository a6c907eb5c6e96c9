"""Generated datasets: content rules, determinism, nnU-Net's readers, safe writing, the CLI."""

import json
from dataclasses import replace

import numpy as np
import pytest
from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_segmamba.cli import main
from nnunet_segmamba.datasets import raw
from nnunet_segmamba.datasets.synthetic import LABELS, PRESETS, SyntheticSpec, generate_case
from nnunet_segmamba.datasets.tasks import TASKS, task_from_preset
from nnunet_segmamba.lateral.axis import reader_axis
from nnunet_segmamba.lateral.pairs import find_name_pairs


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_cases_follow_the_label_rules(preset):
    spec = PRESETS[preset]
    for seed in range(4):
        image, label = generate_case(spec, seed)
        assert image.shape == (spec.channels, *label.shape) and image.dtype == np.float32
        width = label.shape[2]
        columns = np.nonzero(label == LABELS["blob_left"])[2]
        assert np.all(columns < width / 2)
        columns = np.nonzero(label == LABELS["blob_right"])[2]
        assert np.all(columns >= (width - 1) / 2)
        assert (label == LABELS["tube"]).sum() > 0 and 0 < (label == LABELS["speck"]).sum() < 200
        assert np.isfinite(image).all()


def test_blobs_look_alike_so_only_position_tells_them_apart():
    spec = SyntheticSpec(noise=0.0, bias_field=0.0)
    for seed in range(10):
        image, label = generate_case(spec, seed)
        left, right = image[0][label == 1], image[0][label == 2]
        if left.size and right.size:
            assert abs(left.mean() - right.mean()) < 0.3
            return
    pytest.fail("no case with both blobs")


def test_deterministic_from_the_seed():
    a, b, c = (generate_case(PRESETS["aniso"], s) for s in (7, 7, 8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])


def test_written_dataset_reads_back_identically_with_nnunets_readers(tmp_path):
    spec = task_from_preset("aniso", shape=(6, 20, 24), channels=2)
    folder = raw.write_raw_dataset(tmp_path, 905, "Tiny", spec, n_train=2, n_test=1, seed=3)
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["numTraining"] == 2 and dataset["labels"] == LABELS and len(dataset["channel_names"]) == 2
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        "Tiny_000_0000.nii.gz", "Tiny_000_0001.nii.gz", "Tiny_001_0000.nii.gz", "Tiny_001_0001.nii.gz"]
    assert [p.name for p in (folder / "labelsTs").iterdir()] == ["Tiny_002.nii.gz"]

    image, label = generate_case(spec, 3 * 100_003 + 1)
    files = [str(folder / "imagesTr" / f"Tiny_001_000{c}.nii.gz") for c in range(2)]
    for reader in (NibabelIO(), SimpleITKIO(), NibabelIOWithReorient()):
        data, properties = reader.read_images(files)
        np.testing.assert_allclose(data, image, rtol=1e-6)
        assert tuple(properties["spacing"]) == pytest.approx(spec.spacing)
        assert reader_axis(properties) == 2  # W, the side the blobs are labelled by, for every reader
        seg, _ = reader.read_seg(str(folder / "labelsTr" / "Tiny_001.nii.gz"))
        assert np.array_equal(seg[0], label)


def test_existing_dataset_is_kept_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    spec = PRESETS["tiny"]
    first = raw.write_raw_dataset(tmp_path, 906, "A", spec, 2, 0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        raw.write_raw_dataset(tmp_path, 906, "B", spec, 2, 0)

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(raw, "_write_case", broken)
    with pytest.raises(OSError):
        raw.write_raw_dataset(tmp_path, 906, "B", spec, 2, 0, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


def test_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["synth", "-d", "907", "--preset", "2d", "--cases", "5", "--test-cases", "1"]) == 2
    assert "nnUNet_raw is not set" in capsys.readouterr().err
    assert main(["synth", "-d", "907", "--preset", "2d", "--cases", "5", "--test-cases", "1", "--raw",
                 str(tmp_path), "-np", "1"]) == 0
    assert (tmp_path / "Dataset907_Synth2d" / "imagesTs" / "Synth2d_005_0000.nii.gz").is_file()
    capsys.readouterr()
    assert main(["synth", "-d", "907", "--raw", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("nnunet-segmamba synth: error:") and "exists already" in err and not out
    assert main(["synth", "-d", "1000", "--raw", str(tmp_path)]) == 2


@pytest.mark.parametrize("arguments, message", [
    (["--cases", "-3"], "at least 5 training cases"),
    (["--cases", "2"], "5-fold cross-validation needs at least 5"),
    (["--test-cases", "-1"], "0 or more test cases"),
    (["--shape", "8", "0", "8"], "at least 1 voxel"),
    (["--spacing", "1", "-1", "1"], "must be positive"),
    (["-np", "0"], "1 or more processes"),
])
def test_cli_checks_arguments_before_any_output(tmp_path, capsys, arguments, message):
    assert main(["synth", "-d", "909", "--raw", str(tmp_path / "raw"), *arguments]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("nnunet-segmamba synth: error: ") and message in err and not out
    assert not (tmp_path / "raw").exists()


def test_thin_preset_draws_a_thinner_tube():
    thick, thin = (generate_case(replace(PRESETS["thin"], tube_radius=r, noise=0.0), 5)[1] for r in (1.5, 1.0))
    assert 0 < (thin == LABELS["tube"]).sum() < 0.6 * (thick == LABELS["tube"]).sum()


def test_brain_cases_are_the_deformed_template_with_lateral_tissue_labels():
    spec = TASKS["mni"]
    (image, label), (again, _), (other, _) = (spec.generate(s) for s in (1, 1, 2))
    assert image.shape == (1, *label.shape) and image.dtype == np.float32 and np.isfinite(image).all()
    assert np.array_equal(image, again) and not np.array_equal(image, other)
    counts = np.bincount(label.ravel(), minlength=5)
    assert counts.min() > 0.02 * label.size  # grey and white matter on both sides
    assert 0.6 < counts[1] / counts[2] < 1.6 and 0.6 < counts[3] / counts[4] < 1.6  # a symmetric template
    brain = np.nonzero(label)
    left = np.isin(label[brain], (1, 3))
    assert brain[2][left].mean() + 3 < brain[2][~left].mean()  # low W is the patient's left
    # T1 contrast: white matter brighter than grey matter, both brighter than the background
    means = [image[0][np.isin(label, values)].mean() for values in ((0,), (1, 2), (3, 4))]
    assert means[0] < means[1] < means[2]
    assert set(spec.labels) == {"background", "gray_matter_left", "gray_matter_right", "white_matter_left",
                                "white_matter_right"}
    assert find_name_pairs(list(spec.labels)) == [("gray_matter_left", "gray_matter_right"),
                                                  ("white_matter_left", "white_matter_right")]


def test_presets_refuse_settings_they_do_not_have(tmp_path, capsys):
    with pytest.raises(ValueError, match="no setting shape"):
        task_from_preset("mni", shape=(8, 8, 8))
    assert main(["synth", "-d", "908", "--preset", "mni", "--channels", "2", "--raw", str(tmp_path)]) == 2
    assert "no setting channels" in capsys.readouterr().err and not any(tmp_path.iterdir())
