"""The No-Mamba ablations: every Mamba mixer an identity and nothing else changed, as networks and as trainers."""

import numpy as np
import pytest
import torch
from torch import nn

from nnunet_segmamba.blocks import ConvOps, ResidualMambaLayer, TSMambaBlock
from nnunet_segmamba.mamba import Mamba, TokenIdentity, plane_orders
from nnunet_segmamba.networks.mambaclinix import MambaClinix
from nnunet_segmamba.networks.plans import build_network
from nnunet_segmamba.networks.segmamba import SegMamba, SegMambaV2
from nnunet_segmamba.tools.environment import find_trainer, trainers_folder
from nnunet_segmamba.training.mambaclinix import nnUNetTrainerMambaClinix, nnUNetTrainerMambaClinixNoMamba
from nnunet_segmamba.training.segmamba import (nnUNetTrainerSegMamba, nnUNetTrainerSegMambaNoMamba,
                                               nnUNetTrainerSegMambaV2, nnUNetTrainerSegMambaV2NoMamba)
from tests import nnunet_plans

NETWORKS = [SegMambaV2, SegMamba, MambaClinix]
EXAMPLES = ["iso", "anisotropic", "2d", "resenc"]  # of tests.nnunet_plans: 3d, [1, 2, 2] strides, 2d, ResEnc
ABLATIONS = {nnUNetTrainerSegMambaV2NoMamba: nnUNetTrainerSegMambaV2,  # ablation: its full trainer
             nnUNetTrainerSegMambaNoMamba: nnUNetTrainerSegMamba,
             nnUNetTrainerMambaClinixNoMamba: nnUNetTrainerMambaClinix}


def build(network_class: type[nn.Module], configuration, **options) -> nn.Module:
    torch.manual_seed(0)
    return build_network(network_class, configuration, 1, 3, True, **options)


def mamba_layers(network: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in network.named_modules() if isinstance(module, Mamba)}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("network_class", NETWORKS)
@pytest.mark.parametrize("example", EXAMPLES)
def test_only_the_mamba_layers_go(network_class, example):
    """Every Mamba layer becomes a TokenIdentity in its place; all other parameters keep their names and shapes."""
    configuration = nnunet_plans.EXAMPLES[example]()
    full, ablated = build(network_class, configuration), build(network_class, configuration, mamba=False)
    mambas = mamba_layers(full)
    assert mambas and not mamba_layers(ablated)
    assert [name for name, m in ablated.named_modules() if isinstance(m, TokenIdentity)] == list(mambas)
    under_mamba = tuple(f"{name}." for name in mambas)
    assert {n: p.shape for n, p in ablated.named_parameters()} == {
        n: p.shape for n, p in full.named_parameters() if not n.startswith(under_mamba)}
    assert count(ablated) == count(full) - sum(count(m) for m in mambas.values())


def stage_shapes(spatial: tuple[int, ...], strides: list[list[int]]) -> list[tuple[int, ...]]:
    """Deep-supervision output sizes: the input divided by the cumulative strides, all stages but the deepest."""
    return [tuple(s // c for s, c in zip(spatial, total)) for total in np.cumprod(strides, axis=0)[:-1]]


@pytest.mark.parametrize("network_class", NETWORKS)
@pytest.mark.parametrize("example", EXAMPLES)
def test_output_shapes_are_the_full_networks(network_class, example):
    """With and without deep supervision, at twice the total stride: the shapes nnU-Net's targets have, which the
    full networks' own tests check their outputs against."""
    configuration = nnunet_plans.EXAMPLES[example]()
    strides = configuration.pool_op_kernel_sizes
    spatial = tuple(int(2 * t) for t in np.prod(strides, axis=0))
    x = torch.randn(1, 1, *spatial)
    network = build(network_class, configuration, mamba=False)
    with torch.no_grad():
        assert [tuple(o.shape) for o in network(x)] == [(1, 3, *s) for s in stage_shapes(spatial, strides)]
        network.decoder.deep_supervision = False
        assert network(x).shape == (1, 3, *spatial)


def test_blocks_keep_their_residual_paths():
    """TSMamba: t + LN(t), then the MLP; MambaClinix's layer: t + Linear(LN(LN(t)))."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 6, 5)
    block = TSMambaBlock(8, [3, 3, 3], ConvOps(nn.Conv3d, True, nn.InstanceNorm3d, {"affine": True}, None, {},
                                               nn.LeakyReLU, {}), plane_orders(3), mamba=False)
    z = block.gsc(x)
    t = z.flatten(2).transpose(1, 2)
    t = t + block.norm_mixer(t)
    t = t + block.mlp(block.norm_mlp(t))
    assert torch.allclose(block(x), t.transpose(1, 2).reshape(x.shape), atol=1e-6)

    layer = ResidualMambaLayer(8, mamba=False)
    t = x.flatten(2).transpose(1, 2)
    expected = t + layer.proj(layer.norm_out(layer.norm_in(t)))
    assert torch.allclose(layer(x), expected.transpose(1, 2).reshape(x.shape), atol=1e-6)


@pytest.mark.parametrize("network_class", NETWORKS)
def test_feature_map_size_drops_the_mixers_activations(network_class):
    configuration = nnunet_plans.iso()
    full, ablated = build(network_class, configuration), build(network_class, configuration, mamba=False)
    size = [64, 64, 64]
    assert 0 < ablated.compute_conv_feature_map_size(size) < full.compute_conv_feature_map_size(size)


def test_plans_arch_kwargs_can_turn_mamba_off():
    configuration = nnunet_plans.iso()
    configuration.configuration["architecture"]["arch_kwargs"]["mamba"] = False
    assert not mamba_layers(build(SegMambaV2, configuration))


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda t: t.__name__)
def test_nnunets_lookup_finds_the_trainers_and_they_build_no_mamba(ablation, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", trainers_folder())
    found = find_trainer(ablation.__name__)
    assert found is ablation and issubclass(found, ABLATIONS[ablation])
    configuration = nnunet_plans.iso()
    network = found.build_network_architecture(None, configuration, 1, 3, False)
    full = ABLATIONS[ablation].build_network_architecture(None, configuration, 1, 3, False)
    assert type(network) is type(full) and mamba_layers(full) and not mamba_layers(network)
    assert "No-Mamba" in found.__doc__ and "nnU-Net Revisited" in found.__doc__


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda t: t.__name__)
def test_a_training_step_runs_on_the_cpu(ablation, tmp_path, monkeypatch):
    for name in ("nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("NNUNET_SEGMAMBA_LATERAL", "off")  # no preprocessed cases to read the left-right axis from
    configuration = nnunet_plans.configuration([16, 32, 32], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                                               [[1, 3, 3]] + [[3, 3, 3]] * 3, [4, 8, 8, 16], batch_size=2)
    plans = {"dataset_name": "Dataset999_Ablation", "plans_name": "nnUNetPlans", "label_manager": "LabelManager",
             "configurations": {"3d_fullres": configuration.configuration}, "continue_training": False}
    dataset = {"labels": {"background": 0, "a": 1, "b": 2}, "channel_names": {"0": "x"}, "numTraining": 2,
               "file_ending": ".nii.gz"}
    preprocessed = tmp_path / "nnUNet_preprocessed" / "Dataset999_Ablation" / configuration.data_identifier
    preprocessed.mkdir(parents=True)
    (preprocessed / "case.b2nd").touch()  # initialize() infers nnU-Net's dataset class from the file endings
    trainer = ablation(plans, "3d_fullres", 0, dataset, torch.device("cpu"))
    trainer.initialize()
    assert not mamba_layers(trainer.network)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    shapes = stage_shapes((16, 32, 32), configuration.pool_op_kernel_sizes)
    targets = [torch.randint(0, 3, (2, 1, *s)).float() for s in shapes]
    loss = trainer.train_step({"data": torch.randn(2, 1, 16, 32, 32), "target": targets})["loss"]
    assert np.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))
