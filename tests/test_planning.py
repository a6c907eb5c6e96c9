"""Mamba-aware planners: valid plans for our networks within the memory target, by the calibrated estimate."""

import json
import math

import pytest
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_segmamba.cli import main
from nnunet_segmamba.datasets.raw import write_raw_dataset
from nnunet_segmamba.datasets.tasks import task_from_preset
from nnunet_segmamba.networks.plans import check_patch_size
from nnunet_segmamba.plans import memory
from nnunet_segmamba.plans.memory import CALIBRATION_FILE, MemoryModel, fit, load_calibration
from nnunet_segmamba.plans.planners import PLANNERS
from tests import nnunet_plans

DATASET = 952
TARGETS = (1.0, 4.0, 12.0)


@pytest.fixture(scope="module")
def fingerprinted(tmp_path_factory):
    """A generated dataset (4 cases of 96x128x128) with nnU-Net's fingerprint, in nnU-Net folders of its own."""
    root = tmp_path_factory.mktemp("planning")
    folders = {name: root / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    with pytest.MonkeyPatch.context() as patch:
        for name, folder in folders.items():
            folder.mkdir()
            patch.setenv(name, str(folder))
        write_raw_dataset(folders["nnUNet_raw"], DATASET, "Plan", task_from_preset("iso", shape=(96, 128, 128)), 4, 0)
        extract_fingerprints([DATASET], num_processes=1)
    return folders


@pytest.fixture
def folders(fingerprinted, monkeypatch):
    for name, folder in fingerprinted.items():
        monkeypatch.setenv(name, str(folder))
    return fingerprinted


def fullres(plans: dict) -> tuple[list[int], int]:
    configuration = plans["configurations"]["3d_fullres"]
    return configuration["patch_size"], configuration["batch_size"]


@pytest.mark.parametrize("family", sorted(PLANNERS))
def test_plans_name_our_network_fit_the_target_and_grow_with_it(folders, family):
    sizes, configurations = [], set()
    for target in TARGETS:
        planner = PLANNERS[family](DATASET, gpu_memory_target_in_gb=target)
        plans = planner.plan_experiment()
        assert planner.plans_identifier == f"nnUNetPlans_{family}_{target:g}G"
        assert (folders["nnUNet_preprocessed"] / f"Dataset{DATASET}_Plan" / f"{planner.plans_identifier}.json").is_file()
        manager = PlansManager(plans)
        for name in plans["configurations"]:
            configuration = manager.get_configuration(name)
            assert configuration.network_arch_class_name == PLANNERS[family].network_class_name
            check_patch_size(configuration)  # what our networks need of the patch
            estimate = planner.estimate_gib(configuration.patch_size, configuration.network_arch_init_kwargs,
                                            configuration.network_arch_init_kwargs_req_import,
                                            configuration.batch_size)
            assert estimate <= target, (name, target, estimate)
            configurations.add(name)
        patch, batch = fullres(plans)
        sizes.append((math.prod(patch), batch))
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # a larger target: a larger (or equal) patch and batch
    assert configurations >= {"2d", "3d_lowres", "3d_fullres"}  # the smallest target's patch needs a lowres stage


@pytest.mark.parametrize("compile_factor", [1.0, 1.3])
def test_batch_fills_the_memory_left_by_the_fixed_part(compile_factor):
    model = MemoryModel(alpha=4.0, gamma=0.5, compile_factor=compile_factor)
    activations, parameters = 0.25e9, 50e6
    batch = model.max_batch_size(8, activations, parameters)
    assert model.peak_gib(batch, activations, parameters) <= 8 < model.peak_gib(batch + 1, activations, parameters)


def test_fit_recovers_a_known_model_and_the_calibration_loads():
    truth = MemoryModel(alpha=5.0, gamma=0.8)
    points = [{"batch_size": b, "activations": a, "parameters": 4e7, "peak_gib": truth.peak_gib(b, a, 4e7)}
              for b, a in ((2, 0.2e9), (2, 0.45e9), (4, 0.45e9))]
    fitted = fit(points)
    assert fitted.alpha == pytest.approx(5.0) and fitted.gamma == pytest.approx(0.8)
    models = load_calibration()
    assert set(models) >= {p.network_class_name for p in PLANNERS.values()}
    # the shipped calibration never under-estimates its own measured peaks, eager or compiled (nnUNetv2_train's
    # default), and is tight where targets are
    for network, entry in json.loads(CALIBRATION_FILE.read_text())["networks"].items():
        model = models[network]
        assert len(entry["points"]) >= 4 and "compiled" in entry, network
        for p in entry["points"]:
            estimate = model.peak_gib(p["batch_size"], p["activations"], p["parameters"])
            assert estimate >= 0.99 * p["peak_gib"], (network, p)
            assert p["peak_gib"] < 4 or estimate <= 1.12 * model.compile_factor * p["peak_gib"], (network, p)
            if [p["patch_size"], p["batch_size"]] == [entry["compiled"]["patch_size"], entry["compiled"]["batch_size"]]:
                assert estimate >= 0.99 * entry["compiled"]["compiled_peak_gib"], (network, p)


def test_calibration_command_fits_points_and_keeps_compile_factors(tmp_path, capsys):
    """`python -m nnunet_segmamba.plans.memory`: points from benchmark files, then compile factors from a
    `benchmark --compile` file, which new points keep; a compiled peak below the eager one leaves the factor 1."""
    network = "nnunet_segmamba.networks.segmamba.SegMambaV2"
    architecture = nnunet_plans.configuration([32] * 3, [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3,
                                              [4, 8, 8]).configuration["architecture"]

    def benchmark_file(name, batch, eager, compiled=None, gpu="Test GPU"):
        result = {"network": network, "train_peak_gib": eager,
                  "compiled": None if compiled is None else {"peak_gib": compiled}}
        path = tmp_path / name
        path.write_text(json.dumps({"gpu": gpu, "patch_size": [32] * 3, "batch_size": batch, "in_channels": 1,
                                    "num_classes": 2, "architecture": architecture, "results": [result]}))
        return str(path)

    points = [benchmark_file(f"b{b}.json", b, peak) for b, peak in ((1, 1.0), (2, 1.8), (4, 3.4))]
    output = tmp_path / "calibration.json"
    assert memory.main(["--how", "eager", *points, "-o", str(output)]) == 0
    eager = load_calibration(output)[network]
    assert eager.compile_factor == 1.0 and eager.alpha > 0
    assert memory.main(["--compiled", "--how", "compiled", benchmark_file("c.json", 2, 1.8, 2.16), "-o",
                        str(output)]) == 0
    compiled = load_calibration(output)[network]
    assert compiled.compile_factor == pytest.approx(1.2)
    assert (compiled.alpha, compiled.gamma) == (eager.alpha, eager.gamma)
    assert compiled.peak_gib(2, 1e8, 1e6) == pytest.approx(1.2 * eager.peak_gib(2, 1e8, 1e6))
    assert "1.20 x (" in capsys.readouterr().out
    assert memory.main(["--how", "eager again", *points, "-o", str(output)]) == 0
    assert load_calibration(output)[network].compile_factor == pytest.approx(1.2)
    assert memory.main(["--compiled", "--how", "less", benchmark_file("l.json", 2, 1.8, 1.5), "-o", str(output)]) == 0
    assert load_calibration(output)[network].compile_factor == 1.0
    with pytest.raises(ValueError, match="benchmark --compile"):
        memory.main(["--compiled", "--how", "no compile", points[0], "-o", str(output)])
    with pytest.raises(ValueError, match="calibrate from a GPU run"):
        memory.main(["--how", "cpu", benchmark_file("cpu.json", 1, None, gpu=None), "-o", str(output)])


def test_plan_command_reuses_nnunets_data_and_prints_how_to_train(folders, capsys):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments

    plan_experiments([DATASET])  # nnU-Net's own nnUNetPlans.json
    assert main(["plan", "-d", str(DATASET), "-pl", "SegMambaV2", "-gpu_memory_target", "4"]) == 0
    out = capsys.readouterr().out
    assert "nnUNetv2_train 952 CONFIGURATION FOLD -tr nnUNetTrainerSegMambaV2 -p nnUNetPlans_SegMambaV2_4G" in out
    plans = json.loads((folders["nnUNet_preprocessed"] / f"Dataset{DATASET}_Plan" /
                        "nnUNetPlans_SegMambaV2_4G.json").read_text())
    assert plans["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"


@pytest.mark.parametrize("arguments, message", [
    (["-d", "953", "-pl", "SegMamba"], "Could not find a dataset with the ID 953"),
    (["-d", str(DATASET), "-pl", "MambaClinix", "-gpu_memory_target", "0.01"], "too small for MambaClinix"),
    (["-d", str(DATASET), "-pl", "SegMamba", "-gpu_memory_target", "-1"], "positive number of GiB"),
])
def test_plan_command_errors_are_one_line(folders, capsys, arguments, message):
    assert main(["plan", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_plan_command_needs_the_fingerprint_and_the_folders(folders, monkeypatch, capsys):
    write_raw_dataset(folders["nnUNet_raw"], 954, "NoPrint", task_from_preset("tiny"), 2, 0)
    assert main(["plan", "-d", "954", "-pl", "SegMamba"]) == 2
    assert "nnUNetv2_extract_fingerprint -d 954" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_preprocessed")
    assert main(["plan", "-d", str(DATASET), "-pl", "SegMamba"]) == 2
    assert "nnUNet_preprocessed is not set" in capsys.readouterr().err


def test_plan_command_says_the_raw_dataset_is_missing(folders, capsys):
    raw = folders["nnUNet_raw"] / f"Dataset{DATASET}_Plan"
    elsewhere = raw.rename(raw.with_name("moved_away"))
    try:
        assert main(["plan", "-d", str(DATASET), "-pl", "SegMambaV2"]) == 2
    finally:
        elsewhere.rename(raw)
    err = capsys.readouterr().err
    assert err.startswith("nnunet-segmamba plan: error: no raw dataset in") and "point nnUNet_raw" in err
