"""`nnunet-segmamba benchmark` on the CPU with a tiny plans file (the GPU numbers come from the same code)."""

import json

from nnunet_segmamba.cli import main
from nnunet_segmamba.tools.benchmark import PRESETS, preset_plans
from tests import nnunet_plans


def tiny_plans_file(tmp_path):
    configuration = nnunet_plans.configuration([32, 32, 32], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                                               [[3, 3, 3]] * 4, [4, 8, 8, 8], batch_size=1)
    plans = {"dataset_name": "Tiny", "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": configuration.configuration}}
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans))
    return path


def test_table_and_json_for_nnunets_and_our_trainer(tmp_path, capsys, monkeypatch):
    from nnunet_segmamba.tools.environment import trainers_folder

    monkeypatch.setenv("nnUNet_extTrainer", trainers_folder())
    output = tmp_path / "result.json"
    code = main(["benchmark", "--plans-file", str(tiny_plans_file(tmp_path)), "-tr", "nnUNetTrainer",
                 "nnUNetTrainerSegMambaV2", "--resenc", "--device", "cpu", "--amp", "fp32", "--warmup", "0",
                 "--repeats", "1", "--in-channels", "2", "--num-classes", "3", "--predict-volume", "2", "40", "36",
                 "36", "-o", str(output)])
    assert code == 0
    out = capsys.readouterr().out
    assert "patch [32, 32, 32], batch 1, 2 -> 3 channels" in out
    reference, resenc, ours = json.loads(output.read_text())["results"]
    assert reference["trainer"] == "nnUNetTrainer" and ours["trainer"] == "nnUNetTrainerSegMambaV2"
    assert resenc["network"].endswith("ResidualEncoderUNet") and reference["network"].endswith("PlainConvUNet")
    assert resenc["params_m"] > reference["params_m"]  # ResEnc's deeper encoder at the same geometry
    assert ours["params_m"] > reference["params_m"] > 0 and ours["gflops_forward"] > 0
    assert ours["train_step_ms"] > 0 and ours["inference_ms"] > 0 and ours["train_peak_gib"] is None
    assert "nnUNetTrainerSegMambaV2" in out.splitlines()[-2] and "volume s" in out
    assert all(r["volume_s"] > 0 for r in (reference, resenc, ours))


def test_bad_arguments_are_one_line_errors(tmp_path, capsys, monkeypatch):
    plans = str(tiny_plans_file(tmp_path))
    assert main(["benchmark", "--plans-file", str(tmp_path / "none.json"), "-tr", "nnUNetTrainer"]) == 2
    assert main(["benchmark", "--plans-file", plans, "-c", "2d", "-tr", "nnUNetTrainer"]) == 2
    assert main(["benchmark", "--plans-file", plans, "-tr", "nnUNetTrainerDoesNotExist"]) == 2
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    assert main(["benchmark", "-d", "5", "-tr", "nnUNetTrainer"]) == 2
    assert main(["benchmark", "--plans-file", plans, "-tr", "nnUNetTrainer", "--predict-volume", "4", "64", "64"]) == 2
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert len(errors) == 5 and "--predict-volume needs 4 (the input channels) followed by 3" in errors[4]
    assert "no plans file" in errors[0] and "no configuration '2d'" in errors[1]
    assert "nnUNetTrainerDoesNotExist" in errors[2] and "nnUNet_preprocessed is not set" in errors[3]


def test_presets_are_nnunet_plans():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for name, preset in PRESETS.items():
        configuration = PlansManager(preset_plans(name, 1)).get_configuration(name)
        assert configuration.patch_size == preset["patch_size"]
        assert len(configuration.pool_op_kernel_sizes) == len(preset["features"])
