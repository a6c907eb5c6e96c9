"""What users hit: hand-edited plans, region-based labels, broken kernels, kernel limits, diverging runs,
interrupted checkpoint writes, tools given bad input. (docs/troubleshooting.md lists each case.)"""

import builtins
import sys
import types

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_segmamba.cli import main
from nnunet_segmamba.mamba import backends
from nnunet_segmamba.mamba.scan import selective_scan
from nnunet_segmamba.networks.plans import build_network
from nnunet_segmamba.networks.mambaclinix import MambaClinix
from nnunet_segmamba.networks.segmamba import SegMamba, SegMambaV2
from nnunet_segmamba.training.mambaclinix import nnUNetTrainerMambaClinixRST
from nnunet_segmamba.training.segmamba import nnUNetTrainerSegMambaV2
from tests import nnunet_plans

LABELS = {"background": 0, "a": 1, "b": 2}
REGIONS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}


@pytest.fixture
def make_trainer(tmp_path, monkeypatch):
    """A trainer of ours on a tiny 3d configuration (nothing trained, no data needed)."""
    for name in ("nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("NNUNET_SEGMAMBA_LATERAL", "off")  # no preprocessed cases to read the left-right axis from

    def make(trainer_class=nnUNetTrainerSegMambaV2, labels=LABELS):
        configuration = nnunet_plans.configuration([16, 32, 32], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                                                   [[1, 3, 3]] + [[3, 3, 3]] * 3, [4, 8, 8, 16])
        plans = {"dataset_name": "Dataset999_Robust", "plans_name": "nnUNetPlans",
                 "configurations": {"3d_fullres": configuration.configuration}, "label_manager": "LabelManager",
                 "continue_training": False}
        dataset = {"labels": labels, "channel_names": {"0": "x"}, "numTraining": 2, "file_ending": ".nii.gz"}
        if labels is REGIONS:
            dataset["regions_class_order"] = [1, 2, 3]
        return trainer_class(plans, "3d_fullres", 0, dataset, torch.device("cpu"))
    return make


def test_hand_edited_patch_not_divisible_by_the_strides_names_both_keys():
    configuration = nnunet_plans.iso()
    configuration.configuration["patch_size"] = [64, 64, 48]
    with pytest.raises(ValueError, match=r"patch_size \[64, 64, 48\] does not fit architecture.arch_kwargs.strides"):
        build_network(SegMambaV2, configuration, 1, 2, True)


@pytest.mark.parametrize("network_class", [SegMambaV2, SegMamba, MambaClinix])
@pytest.mark.parametrize("mamba", [True, False])
def test_input_not_divisible_by_the_strides_is_one_clear_error_for_every_network(network_class, mamba):
    plans = nnunet_plans.configuration([16, 32, 32], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4, [4, 8, 16, 16])
    network = build_network(network_class, plans, 1, 2, True, mamba=mamba)  # total stride (8, 8, 8)
    with pytest.raises(ValueError, match=rf"{network_class.__name__}: input of spatial size \(16, 32, 36\) is not "
                                         rf"divisible by the network's total stride \(8, 8, 8\)"):
        network(torch.randn(1, 1, 16, 32, 36))


def test_region_based_labels_train_with_nnunets_bce_loss(make_trainer):
    trainer = make_trainer(labels=REGIONS)
    heads = trainer.label_manager.num_segmentation_heads
    assert heads == 3
    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, heads, True)
    loss = trainer._build_loss()
    assert isinstance(loss, DeepSupervisionWrapper) and isinstance(loss.loss, DC_and_BCE_loss)
    outputs = network(torch.randn(2, 1, 16, 32, 32))
    targets = [(torch.rand(2, heads, *o.shape[2:]) > 0.5).float() for o in outputs]
    value = loss(outputs, targets)
    value.backward()
    assert torch.isfinite(value) and all(o.shape[1] == heads for o in outputs)


def test_region_specific_tversky_refuses_region_based_labels(make_trainer):
    with pytest.raises(ValueError, match="region-based labels"):
        make_trainer(nnUNetTrainerMambaClinixRST, REGIONS)._build_loss()


@pytest.mark.parametrize("error", [ImportError("No module named 'selective_scan_cuda'"),
                                   OSError("selective_scan_cuda.so: undefined symbol: _ZN3c10..."),
                                   RuntimeError("CUDA driver version is insufficient")])
def test_mamba_ssm_that_does_not_import_is_reported(monkeypatch, error):
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name.startswith("mamba_ssm"):
            raise error
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    ops, reason = backends._mamba_kernel_import()
    assert ops is None and type(error).__name__ in reason and str(error) in reason


def fake_mamba_ssm(monkeypatch, kernel):
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = kernel
    monkeypatch.setitem(sys.modules, interface.__name__, interface)


def test_without_causal_conv1d_the_conv_runs_in_pytorch(monkeypatch):
    fake_mamba_ssm(monkeypatch, selective_scan)
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # import fails
    ops, reason = backends._mamba_kernel_import()
    assert reason == "" and "no causal-conv1d" in ops.description
    assert ops.conv1d_silu is backends.conv1d_silu_torch
    assert backends.probe(ops, torch.device("cpu")) == ""


def test_kernels_that_do_not_run_on_this_gpu_are_reported():
    def no_kernel_image(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    ops = backends.ScanOps("cuda", "mamba-ssm (test)", backends.conv1d_silu_torch, no_kernel_image)
    assert "no kernel image is available" in backends.probe(ops, torch.device("cpu"))


def test_kernels_that_compute_wrong_values_are_not_taken():
    """A kernel that runs but is wrong (a miscompiled build, say) fails the self-test against the PyTorch scan."""
    def off_by_a_bit(*args, **kwargs):
        return 1.01 * selective_scan(*args, **kwargs)

    def not_a_number(*args, **kwargs):
        return torch.full((1, 2, 40), float("nan"))

    for kernel, error in ((off_by_a_bit, "relative error 1.0e-02"), (not_a_number, "relative error nan")):
        ops = backends.ScanOps("triton", "Triton (test)", backends.conv1d_silu_torch, kernel)
        assert f"failed a self-test against the PyTorch scan ({error})" in backends.probe(ops, torch.device("cpu"))


def test_batches_beyond_the_kernels_int32_indexing_are_split(monkeypatch):
    calls = []

    def kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        calls.append(u.shape[0])
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(5, 4, 100, generator=g) for _ in range(3))
    A = -torch.rand(4, 3, generator=g) - 0.5
    B, C = (torch.randn(5, 3, 100, generator=g) for _ in range(2))
    expected = selective_scan(u, delta, A, B, C, z=z, delta_softplus=True)
    monkeypatch.setattr(backends, "KERNEL_ELEMENT_LIMIT", 2 * 4 * 100)  # two samples per call
    result = backends.split_scan(kernel)(u, delta, A, B, C, z=z, delta_softplus=True)
    assert calls == [2, 2, 1]
    torch.testing.assert_close(result, expected)
    monkeypatch.setattr(backends, "KERNEL_ELEMENT_LIMIT", 100)
    with pytest.raises(RuntimeError, match="NNUNET_SEGMAMBA_SCAN=torch"):
        backends.split_scan(kernel)(u, delta, A, B, C)
    monkeypatch.setattr(backends, "KERNEL_ELEMENT_LIMIT", 2 * 4 * 100)
    weight = torch.randn(4, 1, 4, generator=g)
    torch.testing.assert_close(backends.split_conv(backends.conv1d_silu_torch)(u, weight, None),
                               backends.conv1d_silu_torch(u, weight, None))


def test_a_diverged_run_stops_with_advice(make_trainer):
    trainer = make_trainer()
    trainer.max_non_finite_steps = 3
    for loss in (np.nan, np.inf, 1.0, np.nan, np.nan):  # a finite loss resets the count
        trainer._stop_if_diverged(np.array(loss))
    with pytest.raises(RuntimeError, match=r"not finite for 3 consecutive steps .*NNUNET_SEGMAMBA_AMP=bf16.*checkpoint_latest"):
        trainer._stop_if_diverged(np.array(np.nan))


def preprocessed_folder_for(trainer, tmp_path) -> None:
    """The folder nnU-Net's `initialize` looks for, with one file of its dataset format (nothing is read)."""
    data = tmp_path / "nnUNet_preprocessed" / "Dataset999_Robust" / trainer.configuration_manager.data_identifier
    data.mkdir(parents=True)
    (data / "case.b2nd").touch()


def test_nnunet_compile_sets_the_compiled_backend_on_every_layer(make_trainer, monkeypatch, tmp_path):
    """With nnUNet_compile (nnU-Net wraps the network in torch.compile) our trainer sets the scan backend that
    compiles into the graph (Triton on a GPU; here a stand-in, as nnU-Net compiles only on CUDA) on every Mamba
    layer and logs it."""
    from nnunet_segmamba.mamba import Mamba
    from nnunet_segmamba.training import base

    trainer = make_trainer()
    preprocessed_folder_for(trainer, tmp_path)
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: True)
    monkeypatch.setattr(base, "backend_for_compile", lambda device: "torch")
    with torch._dynamo.config.patch(automatic_dynamic_shapes=True):
        trainer.initialize()
        static = not torch._dynamo.config.automatic_dynamic_shapes
    layers = [m for m in trainer.network.modules() if isinstance(m, Mamba)]
    assert type(trainer.network).__name__ == "OptimizedModule" and layers
    assert all(layer.backend == "torch" for layer in layers) and static
    with open(trainer.log_file) as log:
        assert "requested: torch" in log.read()


def test_a_network_built_for_nnunet_compile_takes_the_compiled_backend(make_trainer, monkeypatch, tmp_path):
    """nnUNetv2_predict compiles the network that build_network_architecture returns when nnUNet_compile is set
    (nothing of ours runs in between): the layers carry the compiled backend from the start, and dynamo keeps
    shapes static. A trainer that does not compile (here: on the CPU) resets the layers to the environment's
    choice in `initialize`."""
    from nnunet_segmamba.mamba import Mamba
    from nnunet_segmamba.training import base

    monkeypatch.setenv("nnUNet_compile", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(base, "backend_for_compile", lambda device: "torch" if device.type == "cuda" else None)
    trainer = make_trainer()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=True):
        network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3,
                                                     False)
        static = not torch._dynamo.config.automatic_dynamic_shapes
    backends = {m.backend for m in network.modules() if isinstance(m, Mamba)}
    assert backends == {"torch"} and static
    preprocessed_folder_for(trainer, tmp_path)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=True):
        trainer.initialize()
    assert {m.backend for m in trainer.network.modules() if isinstance(m, Mamba)} == {None}


def test_an_interrupted_checkpoint_write_keeps_the_previous_checkpoint(make_trainer, monkeypatch, tmp_path):
    trainer = make_trainer()
    trainer.network = torch.nn.Linear(2, 2)
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(path))
    saved = torch.load(path, weights_only=False)
    real_save = torch.save

    def dies_halfway(obj, filename, *args, **kwargs):
        with open(filename, "wb") as file:
            file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    trainer.current_epoch = 7
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(path))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=False)["current_epoch"] == saved["current_epoch"]
    assert not list(tmp_path.glob("*.partial"))


def test_tools_refuse_unwritable_outputs_before_working(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["demo", "--workspace", str(blocker / "demo"), "-tr", "nnUNetTrainer"]) == 1
    assert "Not a directory" in capsys.readouterr().err
    assert main(["benchmark", "--preset", "3d_64", "-tr", "nnUNetTrainer", "-o", str(blocker / "x.json")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert main(["synth", "-d", "950", "--raw", str(blocker / "raw"), "--cases", "5"]) == 1
    assert "choose a writable --raw folder" in capsys.readouterr().err
