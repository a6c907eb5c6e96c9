"""On a CUDA GPU: our exact scan against mamba-ssm's kernels, layers and whole networks across backends,
and state dicts between mamba_ssm.Mamba and ours. Skipped without CUDA (conftest.py)."""

import copy

import pytest
import torch

from nnunet_segmamba.mamba import Mamba, backends, plane_orders, scan_ops
from nnunet_segmamba.mamba.scan import selective_scan
from nnunet_segmamba.networks.mambaclinix import MambaClinix
from nnunet_segmamba.networks.plans import build_network
from nnunet_segmamba.networks.segmamba import SegMamba, SegMambaV2
from nnunet_segmamba.tools.benchmark.configurations import preset_plans
from nnunet_segmamba.training.base import autocast_dtype

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 convolutions and matmuls would dominate the differences we want to see."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_auto_backend_is_the_kernels():
    ops = scan_ops(CUDA)
    assert ops.name == "cuda"


def gpu_scan(backend: str):
    """The selective scan of a GPU backend: mamba-ssm's kernel or our Triton kernels."""
    if backend == "cuda":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn
    from nnunet_segmamba.mamba.triton_scan import triton_selective_scan
    return triton_selective_scan


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("length,groups", [(100, 1), (4096, 3), (32768, 1)])
def test_torch_scan_equals_gpu_kernels(length, groups, backend):
    """Outputs and gradients; and each scan's forward without grad (inference: ours then keeps no checkpoints)
    gives the training forward's output bit for bit."""
    g = torch.Generator(device=CUDA).manual_seed(length)
    dim, n = 48, 16
    shapes = [(2, dim, length), (2, dim, length), (dim, n), (2, groups, n, length), (2, groups, n, length), (dim,),
              (2, dim, length), (dim,)]
    tensors = [torch.randn(s, device=CUDA, generator=g) for s in shapes]
    tensors[2] = -torch.rand(dim, n, device=CUDA, generator=g) - 0.1
    results = []
    for fn in (gpu_scan(backend), selective_scan):
        leaves = [t.clone().requires_grad_() for t in tensors]
        u, delta, A, B, C, D, z, bias = leaves
        out = fn(u, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=True)
        grad_out = torch.randn(out.shape, device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(1))
        results.append((out, torch.autograd.grad(out, leaves, grad_out)))
        with torch.no_grad():
            assert torch.equal(fn(*tensors[:7], delta_bias=tensors[7], delta_softplus=True), out)
    (kernel_out, kernel_grads), (ours_out, ours_grads) = results
    assert relative(ours_out, kernel_out) < 1e-5
    for name, ours, kernel in zip("u delta A B C D z delta_bias".split(), ours_grads, kernel_grads):
        assert relative(ours, kernel) < 1e-4, name


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_layer_backends_agree(dtype, tolerance, backend):
    torch.manual_seed(0)
    layers = {"torch": Mamba(64, orders=plane_orders(3), backend="torch").to(CUDA)}
    layers[backend] = copy.deepcopy(layers["torch"])
    layers[backend].backend = backend
    x = torch.randn(2, 16 ** 3, 64, device=CUDA)
    results = {}
    for name, layer in layers.items():
        leaf = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = layer(leaf, (16, 16, 16))
        out.float().square().mean().backward()
        results[name] = [out, leaf.grad] + [p.grad for p in layer.parameters()]
    for ours, kernel in zip(results["torch"], results[backend]):
        assert relative(ours, kernel) < tolerance


def test_state_dicts_move_between_mamba_ssm_and_ours():
    from mamba_ssm import Mamba as MambaSSM

    torch.manual_seed(0)
    reference, ours = MambaSSM(96).to(CUDA), Mamba(96).to(CUDA)
    x = torch.randn(2, 500, 96, device=CUDA)
    ours.load_state_dict(reference.state_dict())
    assert relative(ours(x), reference(x)) < 1e-4
    back = MambaSSM(96).to(CUDA)
    back.load_state_dict(Mamba(96).to(CUDA).state_dict())
    ours.load_state_dict(back.state_dict())
    assert relative(ours(x), back(x)) < 1e-4


@pytest.mark.parametrize("network_class", [SegMambaV2, SegMamba, MambaClinix])
def test_network_at_a_128_plan_gives_the_same_output_with_either_backend(network_class):
    """A state dict trained with one backend loads and predicts the same with the other."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configuration = PlansManager(preset_plans("3d_128", 4)).get_configuration("3d_128")
    torch.manual_seed(0)
    kernels = build_network(network_class, configuration, 4, 4, False).to(CUDA).eval()
    exact = build_network(network_class, configuration, 4, 4, False, scan_backend="torch").to(CUDA).eval()
    exact.load_state_dict(kernels.state_dict())
    x = torch.randn(1, 4, 128, 128, 128, device=CUDA)
    with torch.no_grad():
        assert relative(exact(x), kernels(x)) < 1e-4


def test_trainers_autocast_in_fp16_unless_bf16_is_asked_for(monkeypatch):
    monkeypatch.delenv("NNUNET_SEGMAMBA_AMP", raising=False)
    assert autocast_dtype(CUDA) == torch.float16
    if torch.cuda.is_bf16_supported():
        monkeypatch.setenv("NNUNET_SEGMAMBA_AMP", "bf16")
        assert autocast_dtype(CUDA) == torch.bfloat16


def generated_cases(count: int = 16, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (count, 1, size^3) and labels (count, size^3) from the synthetic generator, on the GPU."""
    import numpy as np

    from nnunet_segmamba.datasets.synthetic import generate_case
    from nnunet_segmamba.datasets.tasks import task_from_preset

    spec = task_from_preset("iso", shape=(size, size, size), size_jitter=0.0)
    cases = [generate_case(spec, seed) for seed in range(count)]
    return (torch.from_numpy(np.stack([image for image, _ in cases])).to(CUDA),
            torch.from_numpy(np.stack([label for _, label in cases])).long().to(CUDA))


def training_losses(network_class: type, scan_backend: str, amp: torch.dtype, images: torch.Tensor,
                    labels: torch.Tensor, iterations: int) -> tuple[list[float], int]:
    """Cross-entropy per iteration of `network_class` (3d_64 plan) trained from one seed on generated cases with
    nnU-Net's SGD settings, one scan backend and one autocast dtype (fp16 with a GradScaler, as nnU-Net does),
    the same batches in the same order for every call; and the number of steps the GradScaler skipped."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    configuration = PlansManager(preset_plans("3d_64", 1)).get_configuration("3d_64")
    torch.manual_seed(0)
    network = build_network(network_class, configuration, 1, 5, False, scan_backend=scan_backend).to(CUDA)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    order = torch.Generator().manual_seed(1)
    losses, skipped = [], 0
    for _ in range(iterations):
        pick = torch.randint(len(images), (2,), generator=order)
        with torch.autocast("cuda", dtype=amp):
            loss = torch.nn.functional.cross_entropy(network(images[pick]).float(), labels[pick])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped += int(scaler.is_enabled() and scaler.get_scale() < scale)
        losses.append(loss.item())
    return losses, skipped


def print_curves(curves: dict[str, list[float]], window: int) -> None:
    import numpy as np

    print("\niteration  " + "  ".join(f"{name:>10}" for name in curves))
    for start in range(0, len(next(iter(curves.values()))), window):
        print(f"{start:4d}-{start + window - 1:<4d} " + "  ".join(
            f"{np.mean(c[start:start + window]):10.4f}" for c in curves.values()))


def test_training_with_triton_follows_the_cuda_loss_curve():
    """Issue 9: a few hundred iterations with our Triton scan reach mamba-ssm's loss curve (within noise)."""
    import numpy as np

    images, labels = generated_cases()
    iterations, window = 300, 50
    curves = {backend: training_losses(SegMambaV2, backend, torch.bfloat16, images, labels, iterations)[0]
              for backend in ("cuda", "triton")}
    print_curves(curves, window)
    first = {b: c[0] for b, c in curves.items()}
    last = {b: float(np.mean(c[-window:])) for b, c in curves.items()}
    assert abs(first["triton"] - first["cuda"]) < 1e-2 * first["cuda"], first  # same weights and batch
    for b in curves:
        assert last[b] < 0.5 * float(np.mean(curves[b][:10])), (b, last[b])  # both learn
    assert abs(last["triton"] - last["cuda"]) < 0.2 * last["cuda"] + 0.01, last  # and reach the same loss


@pytest.mark.parametrize("network_class", [SegMambaV2, SegMamba, MambaClinix])
def test_fp16_with_grad_scaler_trains_as_stably_as_bf16(network_class):
    """Issue 11's AMP evidence: 300 iterations in fp16 (+ GradScaler, nnU-Net's default) and in bf16 (our
    trainers' default): no non-finite loss, few skipped steps, the same loss level."""
    import numpy as np

    images, labels = generated_cases()
    iterations, window = 300, 50
    runs = {name: training_losses(network_class, "cuda", dtype, images, labels, iterations)
            for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))}
    curves = {name: losses for name, (losses, _) in runs.items()}
    print_curves(curves, window)
    print(f"fp16 steps skipped by the GradScaler: {runs['fp16'][1]}")
    for name, losses in curves.items():
        assert np.isfinite(losses).all(), name
    assert runs["fp16"][1] <= 20  # the scaler's first steps find the scale; more would mean overflows in training
    last = {name: float(np.mean(c[-window:])) for name, c in curves.items()}
    assert abs(last["fp16"] - last["bf16"]) < 0.3 * last["bf16"] + 0.01, last


def test_layer_profile_lists_each_backends_kernels_eager_and_compiled(capsys):
    """`benchmarks/scan_profile.py --layer` at a small stage: four sections, each with its wall time and kernels."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("scan_profile",
                                                  Path(__file__).parents[1] / "benchmarks" / "scan_profile.py")
    scan_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scan_profile)
    scan_profile.layer_breakdown("fp16", shown=3, stages=[(32, (8, 8, 8))])
    out = capsys.readouterr().out
    sections = [line for line in out.splitlines() if line.startswith("32 @ 8x8x8")]
    expected = [f"32 @ 8x8x8 {backend} {mode}" for backend in ("cuda", "triton") for mode in ("eager", "compiled")]
    assert [line.split(":")[0] for line in sections] == expected
    assert all("wall" in line and "launches" in line for line in sections)
    assert "_backward_kernel" in out.split("32 @ 8x8x8 triton compiled")[1]


def test_triton_backend_convolves_by_shifted_multiply_adds_when_compiled():
    ops, reason = backends.GPU_OPS["triton"](0)
    assert ops is not None, reason
    assert ops.conv1d_silu is backends.conv1d_silu_shifted and ops.ordered_conv1d_silu is not None


def test_in_place_order_kernels_compile_to_the_eager_layer():
    """`benchmarks/orders_variants.py`'s in-place variant, whose order kernels also run under torch.compile (its
    `network` A/B of whole compiled steps): the compiled layer's output and gradients equal the eager layer's."""
    import dataclasses
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("orders_variants",
                                                  Path(__file__).parents[1] / "benchmarks" / "orders_variants.py")
    orders_variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(orders_variants)
    saved = backends.GPU_OPS["triton"]
    in_place = orders_variants.variants(CUDA)["in-place"]
    calls = []

    def counted(*args):
        calls.append(torch.compiler.is_compiling())
        return in_place.ordered_conv1d_silu(*args)

    try:
        orders_variants.use(dataclasses.replace(in_place, ordered_conv1d_silu=counted))
        torch.manual_seed(0)
        layer = Mamba(32, orders=plane_orders(3), backend="triton").to(CUDA)
        x = torch.randn(2, 8 * 8 * 8, 32, device=CUDA, requires_grad=True)
        results = []
        for run in (layer, torch.compile(layer, dynamic=False)):
            out = run(x, (8, 8, 8))
            results.append([out, *torch.autograd.grad(out.square().sum(), [x, layer.conv1d.weight])])
        assert True in calls  # traced into the compiled graph, not the copies of the shipped compiled path
        for eager, compiled in zip(*results):
            assert relative(compiled, eager) < 1e-4
    finally:
        backends.GPU_OPS["triton"] = saved
        backends._CHOSEN.clear()
        torch._dynamo.reset()
