"""The shared trainer: network from plans, nnU-Net's signature checks, AMP and compile decisions, variants."""

import inspect
import os
import pickle
import subprocess
import sys

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_segmamba.networks.segmamba import SegMambaV2
from nnunet_segmamba.training import base
from nnunet_segmamba.training.segmamba import nnUNetTrainerSegMambaV2, nnUNetTrainerSegMambaV2_250epochs
from nnunet_segmamba.training.variants import trainer_variant, write_variants_module
from tests import nnunet_plans
from tests.dynamo import graph_breaks


def test_build_network_architecture_has_the_27_signature():
    """nnU-Net's trainer and predictor inspect the signature for 'plans_manager' (2.7+ API)."""
    for bound in (nnUNetTrainerSegMambaV2.build_network_architecture,):
        assert list(inspect.signature(bound).parameters)[:2] == ["plans_manager", "configuration_manager"]
    network = nnUNetTrainerSegMambaV2.build_network_architecture(None, nnunet_plans.iso(), 1, 4, False)
    assert isinstance(network, SegMambaV2) and network.decoder.deep_supervision is False


def test_nested_autocast_sets_the_dtype_of_nnunets_own_autocast():
    """Our steps wrap nnU-Net's `autocast(device, enabled=True)` in one with an explicit dtype; torch makes
    the inner context inherit it. Checked on CPU, where the same mechanism applies."""
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=True):
            assert (a @ b).dtype == torch.bfloat16


def test_amp_and_compile_decisions(monkeypatch):
    monkeypatch.delenv("NNUNET_SEGMAMBA_AMP", raising=False)
    assert base.autocast_dtype(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    assert base.autocast_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setenv("NNUNET_SEGMAMBA_AMP", "bf16")
    with pytest.raises(ValueError, match="NNUNET_SEGMAMBA_AMP=bf16 but Tesla V100 has no bf16: unset it"):
        base.autocast_dtype(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert base.autocast_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setenv("NNUNET_SEGMAMBA_AMP", "fp8")
    with pytest.raises(ValueError, match="NNUNET_SEGMAMBA_AMP='fp8': expected one of fp16, bf16"):
        base.autocast_dtype(torch.device("cpu"))
    monkeypatch.delenv("nnUNet_compile", raising=False)
    assert not base.compile_requested()
    monkeypatch.setenv("nnUNet_compile", "1")
    assert base.compile_requested()


def test_the_log_says_whether_and_why_the_network_compiles(monkeypatch):
    monkeypatch.delenv("nnUNet_compile", raising=False)
    on = base.describe_compile(True, "triton")
    assert on.startswith("torch.compile: on (nnU-Net's default; nnUNet_compile=0 turns it off); Mamba scan backend "
                         "triton: it compiles into the graph")
    assert base.COMPILE_EVIDENCE in on
    monkeypatch.setenv("nnUNet_compile", "0")
    assert base.describe_compile(False, None).startswith("torch.compile: off (nnUNet_compile=0; unset it to compile)")


@pytest.mark.parametrize("network_class", ["SegMambaV2", "SegMamba", "MambaClinix"])
def test_networks_trace_for_torch_compile_without_graph_breaks(network_class):
    """`nnUNet_compile=1` compiles the whole network; with the PyTorch scan nothing in our code breaks the graph
    (on the GPU, mamba-ssm's kernels are calls dynamo cannot trace: the breaks are there only)."""
    from nnunet_segmamba.networks import mambaclinix, segmamba
    from nnunet_segmamba.networks.plans import build_network

    network_class = getattr(segmamba, network_class, None) or getattr(mambaclinix, network_class)
    configuration = nnunet_plans.configuration([32] * 3, [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4,
                                               [4, 8, 16, 16], batch_size=1)
    network = build_network(network_class, configuration, 1, 2, True)
    assert graph_breaks(network, torch.randn(1, 1, 32, 32, 32)) == []


def test_variant_sets_attributes_after_nnunets_init_and_pickles():
    variant = nnUNetTrainerSegMambaV2_250epochs
    assert issubclass(variant, nnUNetTrainerSegMambaV2)
    assert list(inspect.signature(variant.__init__).parameters) == list(
        inspect.signature(nnUNetTrainer.__init__).parameters)
    assert pickle.loads(pickle.dumps(variant)) is variant
    assert "num_epochs=250" in variant.__doc__


def test_variants_module_is_found_by_nnunets_lookup(tmp_path):
    write_variants_module(tmp_path, "short_runs", {
        "nnUNetTrainer_short": (nnUNetTrainer, {"num_epochs": 2}),
        "nnUNetTrainerSegMambaV2_short": (nnUNetTrainerSegMambaV2, {"num_epochs": 3, "initial_lr": 0.005}),
    })
    script = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
              "cls = find('nnUNetTrainerSegMambaV2_short')\n"
              "print(cls.__mro__[1].__module__, cls.__doc__)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "nnUNet_extTrainer": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "nnunet_segmamba.training.segmamba" in result.stdout and "initial_lr=0.005" in result.stdout
    with pytest.raises(ValueError, match="without '__'"):
        write_variants_module(tmp_path, "bad", {"a__b": (nnUNetTrainer, {})})


def test_trainer_variant_takes_name_and_module():
    variant = trainer_variant(nnUNetTrainer, "nnUNetTrainer_x", __name__, num_epochs=1)
    assert variant.__name__ == "nnUNetTrainer_x" and variant.__module__ == __name__
