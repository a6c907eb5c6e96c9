"""`nnunet-segmamba benchmark` on the CPU with a tiny plans file (the GPU numbers come from the same code)."""

import json
from pathlib import Path

import pytest
import torch

from nnunet_segmamba.cli import main
from nnunet_segmamba.tools.benchmark.configurations import PRESETS, preset_plans
from nnunet_segmamba.tools.benchmark.network import Result
from nnunet_segmamba.tools.benchmark.profiling import CATEGORIES, KERNEL_CATEGORIES, kernel_category
from nnunet_segmamba.tools.benchmark.report import format_compiled
from tests import nnunet_plans


def tiny_plans_file(tmp_path, patch=32, features=(4, 8, 8, 8)):
    n_stages = len(features)
    configuration = nnunet_plans.configuration([patch] * 3, [[1, 1, 1]] + [[2, 2, 2]] * (n_stages - 1),
                                               [[3, 3, 3]] * n_stages, list(features), batch_size=1)
    plans = {"dataset_name": "Tiny", "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": configuration.configuration}}
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans))
    return path


def test_table_and_json_for_nnunets_and_our_trainer(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)  # our trainers are found without the user's hook
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
    # a scan that cannot run here (no CUDA; on a GPU machine: mamba-ssm not installed), before any measuring
    assert main(["benchmark", "--plans-file", plans, "-tr", "nnUNetTrainer", "--device", "cpu", "--backends", "torch",
                 "cuda"]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("nnunet-segmamba benchmark: error:")]
    assert len(errors) == 6 and "--predict-volume needs 4 (the input channels) followed by 3" in errors[4]
    assert "--backends cuda: Scan backend 'cuda' was requested" in errors[5] and out == ""
    assert "no plans file" in errors[0] and "no configuration '2d'" in errors[1]
    assert "nnUNetTrainerDoesNotExist" in errors[2] and "nnUNet_preprocessed is not set" in errors[3]


def test_presets_are_nnunet_plans():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    for name, preset in PRESETS.items():
        configuration = PlansManager(preset_plans(name, 1)).get_configuration(name)
        assert configuration.patch_size == preset["patch_size"]
        assert len(configuration.pool_op_kernel_sizes) == len(preset["features"])


KERNELS = {  # names as torch.profiler reports them on an H100/H200 (arguments shortened)
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_nn_align8>(Params)": "matmul",
    "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__"
    "5x_cublas": "matmul",
    "sm90_xmma_fprop_implicit_gemm_indexed_wo_smem_f16f16_f16f32_f32_ndhwc_tilesize128x64x64_warpgroupsize1x1x1_g1_"
    "execute_kernel__5x_cudnn": "convolution",
    "sm80_xmma_wgrad_implicit_gemm_indexed_f16f16_f16f32_f32_ndhwc_kernel_cudnn": "convolution",
    "void cudnn::detail::implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>(int, int)":
        "convolution",
    "void at::native::(anonymous namespace)::conv_depthwise3d_cuda_kernel<float, float, 3, 3, 3>(...)": "convolution",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true, (cudnnKernelDataType_t)0>"
    "(...)": "copy/layout",
    "cudnn::bn_bw_1C11_kernel_new<__half, float, float2, 512, true, 1, true>(...)": "normalization",
    "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::leaky_relu_kernel("
    "at::TensorIteratorBase&, c10::Scalar const&)::{lambda(float)#1}, std::array<char*, 2> >(int, ...)": "elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::leaky_relu_backward_kernel("
    "at::TensorIteratorBase&, c10::Scalar const&)::{lambda(c10::Half, c10::Half)#1}, std::array<char*, 3> >(int, ...)":
        "elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1> >(...)":
        "elementwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::"
    "{lambda(float)#1}, std::array<char*, 2> >(int, ...)": "copy/layout",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, "
    "unsigned int, 5, 64, 64>(...)": "copy/layout",
    "Memcpy DtoD (Device -> Device)": "copy/layout",
    "_forward_kernel": "scan",
    "_backward_kernel": "scan",
    "void selective_scan_fwd_kernel<Selective_Scan_fwd_kernel_traits<32, 4, 1, true, true, c10::Half> >(SSMParamsBase)":
        "scan",
    "void causal_conv1d_fwd_kernel<Causal_conv1d_fwd_kernel_traits<128, 4, true, c10::Half> >(ConvParamsBase)": "scan",
    "void at::native::batch_norm_collect_statistics_kernel<at::native::InvStd, float, float, float, int>(...)":
        "normalization",
    "void at::native::batch_norm_backward_elemt_kernel<float, float, float, int>(...)": "normalization",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(int, float, ...)":
        "normalization",
    "void at::native::(anonymous namespace)::nll_loss2d_forward_kernel<float, long>(...)": "reduction",
    "void cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>(float*, float const*, int)":
        "reduction",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
    "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
    "unsigned int, float, 4, 4> >(...)": "reduction",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<3>, at::native::(anonymous namespace)::PointwiseOpScalarFunctor<float, 3, 2, 2>, "
    "std::multiplies<float>, float>(...)": "optimizer",
    "void at::native::upsample_trilinear3d_out_frame<c10::Half, float>(...)": "copy/layout",
    # the CPU fallback's op names
    "aten::convolution_backward": "convolution",
    "aten::addmm": "matmul",
    "aten::native_batch_norm": "normalization",
    "_SelectiveScanBackward": "scan",
    "Optimizer.step#SGD.step": "optimizer",
    "aten::empty": "other",
}


def test_kernel_category_of_cuda_kernels_and_cpu_ops():
    assert {kernel_category(name) for name in KERNELS} == set(CATEGORIES)
    assert {category for category, _ in KERNEL_CATEGORIES} == set(CATEGORIES) - {"other"}
    assert {name: kernel_category(name) for name in KERNELS} == KERNELS


def test_compile_table_shows_errors_and_graph_breaks():
    def result(trainer, compiled):
        return Result(trainer, 1, 1, 30.0, None, 1, None, "n", compiled=compiled)

    table = format_compiled([
        result("A", {"step_ms": 20.0, "compile_s": 12.0, "peak_gib": 1.5, "graph_breaks": 2,
                     "graph_break_reasons": ["Data-dependent branching"]}),
        result("B", {"error": "BackendCompilerFailed: backend='inductor' raised: InvalidCxxCompiler: No working C++ "
                              "compiler found"})]).splitlines()
    assert table[2].split() == ["A", "20.0", "1.50", "1.50", "12.0", "2"]
    assert table[3].startswith("B") and "error: BackendCompilerFailed" in table[3]
    assert table[4] == "graph breaks of A: Data-dependent branching"


def test_every_row_runs_on_the_cudnn_settings_of_nnunets_commands(tmp_path, monkeypatch):
    """nnUNetv2_train and nnUNetv2_predict autotune cuDNN; so does the benchmark, from its first row (nnU-Net's
    predictor, created by --predict-volume after the first network, would otherwise switch it on midway)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    plans = tiny_plans_file(tmp_path, patch=16, features=(4, 8))
    code = main(["benchmark", "--plans-file", str(plans), "-tr", "nnUNetTrainer", "--device", "cpu", "--amp", "fp32",
                 "--warmup", "1", "--repeats", "1", "--in-channels", "1", "--num-classes", "2"])
    assert code == 0
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic


def test_profile_and_compile_on_cpu(tmp_path, capsys):
    output = tmp_path / "result.json"
    plans = tiny_plans_file(tmp_path, patch=16, features=(4, 8))  # two stages: a short compilation
    code = main(["benchmark", "--plans-file", str(plans), "-tr", "nnUNetTrainer", "--device", "cpu", "--amp", "fp32",
                 "--warmup", "1", "--repeats", "1", "--in-channels", "1", "--num-classes", "2", "--profile",
                 "--compile", "-o", str(output)])
    assert code == 0
    out = capsys.readouterr().out
    assert "nnUNetTrainer: " in out and "ms per step of CPU ops, self CPU time" in out
    categories = out[out.index("category"):out.index("  top kernels")].splitlines()[1:]
    assert [line.split()[0] for line in categories] == list(CATEGORIES)
    lines = out.splitlines()
    compiled_row = lines[next(i for i, line in enumerate(lines) if line.startswith("trainer (torch.compile)")) + 2]
    [result] = json.loads(output.read_text())["results"]
    profile, compiled = result["profile"], result["compiled"]
    assert list(profile["categories"]) == list(CATEGORIES) and profile["categories"]["convolution"] > 0
    assert profile["total_ms"] == pytest.approx(sum(profile["categories"].values()))
    assert len(profile["top"]) == 8 and profile["top"][0]["ms_per_step"] >= profile["top"][-1]["ms_per_step"]
    if "error" in compiled:  # no working C++ compiler for inductor, say
        assert compiled_row == f"{'nnUNetTrainer':<34} error: {compiled['error']}"
    else:
        assert compiled["step_ms"] > 0 and compiled["compile_s"] > 0 and compiled["graph_breaks"] == 0
        assert compiled_row.split()[:2] == ["nnUNetTrainer", f"{compiled['step_ms']:.1f}"]
        # the compiled step profiled too: where nnUNetv2_train's default step spends its time
        assert list(compiled["profile"]["categories"]) == list(CATEGORIES) and compiled["profile"]["total_ms"] > 0
        assert "nnUNetTrainer (torch.compile): " in out


def test_compiled_step_runs_the_mamba_layers_on_the_compile_backend():
    """`--compile` times what our trainers run under nnUNet_compile: the layers on `backend_for_compile`'s
    scan while compiled, back to the eager choice afterwards (a stand-in backend here: on the CPU it is None)."""
    import torch

    from nnunet_segmamba.mamba import Mamba
    from nnunet_segmamba.tools.benchmark.compiled import compiled_training

    network = torch.nn.Sequential(Mamba(8), Mamba(8))
    seen = []

    def make_step(net):
        def step():
            seen.append([m.backend for m in net.modules() if isinstance(m, Mamba)])
        return step

    result = compiled_training(make_step, network, torch.device("cpu"), warmup=0, repeats=1, backend="torch")
    assert "error" not in result and seen and all(backends == ["torch", "torch"] for backends in seen)
    assert [m.backend for m in network.modules() if isinstance(m, Mamba)] == [None, None]


def test_eager_steps_run_the_environments_scan_under_nnunet_compile(tmp_path, capsys, monkeypatch):
    """With nnUNet_compile=1 exported on a CUDA machine our trainers' build puts the Mamba layers on the compiled
    scan (for nnU-Net's predictor, which compiles what the build returns); the benchmark's eager steps still time
    the environment's choice. Here on the CPU, where the stand-in compiled scan ('cuda') cannot run."""
    import torch

    from nnunet_segmamba.tools.environment import trainers_folder
    from nnunet_segmamba.training import base

    monkeypatch.setenv("nnUNet_extTrainer", trainers_folder())
    monkeypatch.setenv("nnUNet_compile", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(base, "backend_for_compile", lambda device: "cuda")
    output = tmp_path / "result.json"
    with torch._dynamo.config.patch(automatic_dynamic_shapes=True):
        code = main(["benchmark", "--plans-file", str(tiny_plans_file(tmp_path)), "-tr", "nnUNetTrainerSegMambaV2",
                     "--device", "cpu", "--amp", "fp32", "--warmup", "0", "--repeats", "1", "-o", str(output)])
    [result] = json.loads(output.read_text())["results"]
    assert code == 0 and result["train_step_ms"] > 0


def test_saved_activations_charges_what_autograd_saves_to_the_module_saving_it():
    import importlib.util

    spec = importlib.util.spec_from_file_location("saved_activations", Path(__file__).parents[1] / "benchmarks" /
                                                  "saved_activations.py")
    saved_activations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(saved_activations)
    network = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    charged = saved_activations.saved_bytes(network, torch.randn(3, 4), torch.bfloat16)
    assert charged["1"] == 3 * 8 * 2  # ReLU keeps its bf16 output
    assert charged["0"] >= 3 * 4 * 2 and charged["2"] >= 8 * 2 * 2  # the inputs (and weights) cast to bf16
    rows = saved_activations.table(charged, network, depth=1)
    assert [kind for _, kind, _ in rows] == [type(network[int(name)]).__name__ for name, _, _ in rows]


def test_rows_appear_as_measured_and_an_interruption_keeps_them(tmp_path, capsys, monkeypatch):
    """Each network's row is printed (and the -o JSON rewritten) as soon as it is measured: Ctrl-C during the second
    network leaves the first one's row on stdout and in the file, and exits with 130."""
    from nnunet_segmamba.tools import benchmark

    measured = benchmark.benchmark_network

    def interrupted_second(name, *args, **kwargs):
        if name != "nnUNetTrainer":
            raise KeyboardInterrupt
        return measured(name, *args, **kwargs)

    monkeypatch.setattr(benchmark, "benchmark_network", interrupted_second)
    output = tmp_path / "result.json"
    code = main(["benchmark", "--plans-file", str(tiny_plans_file(tmp_path)), "-tr", "nnUNetTrainer",
                 "nnUNetTrainerSegMambaV2", "--device", "cpu", "--amp", "fp32", "--warmup", "0", "--repeats", "1",
                 "-o", str(output)])
    out, err = capsys.readouterr()
    assert code == 130 and "measuring nnUNetTrainerSegMambaV2 ..." in err
    assert err.splitlines()[-1] == (f"nnunet-segmamba benchmark: error: interrupted after 1 of 2 networks; {output} "
                                    f"holds them")
    rows = [line for line in out.splitlines() if line.startswith("nnUNetTrainer")]
    assert len(rows) == 1 and rows[0].split()[4] == "1.00"  # the step's ratio to itself
    assert [r["trainer"] for r in json.loads(output.read_text())["results"]] == ["nnUNetTrainer"]


def test_backends_give_each_mamba_network_a_row_per_scan_and_compile_it_once(tmp_path, capsys, monkeypatch):
    """--backends cuda triton: SegMamba-V2 is timed eager on each scan, side by side, and compiled once; networks
    without Mamba layers (PlainConvUNet, an ablation) get one row. Timing is replaced by a recorder here."""
    from nnunet_segmamba import tools
    from nnunet_segmamba.mamba import Mamba, backends
    from nnunet_segmamba.tools.environment import trainers_folder

    calls = []

    def record(label, network, *args, compiled=False, **kwargs):
        calls.append((label, {m.backend for m in network.modules() if isinstance(m, Mamba)}, compiled))
        return Result(label, 1.0, 1.0, 10.0, None, 1.0, None, "net",
                      compiled={"step_ms": 5.0, "compile_s": 1.0, "peak_gib": None, "graph_breaks": 0} if compiled
                      else None)

    monkeypatch.setattr(tools.benchmark, "benchmark_network", record)
    checked, real_scan_ops = [], backends.scan_ops

    def scan_ops(device, backend=None):  # the scans of --backends are checked before measuring: as if both ran here
        checked.append(backend)
        return real_scan_ops(device)
    monkeypatch.setattr(backends, "scan_ops", scan_ops)
    monkeypatch.setenv("nnUNet_extTrainer", trainers_folder())
    code = main(["benchmark", "--plans-file", str(tiny_plans_file(tmp_path)), "-tr", "nnUNetTrainer",
                 "nnUNetTrainerSegMambaV2", "nnUNetTrainerSegMambaV2NoMamba", "--device", "cpu", "--backends", "cuda",
                 "triton", "--compile"])
    assert code == 0 and [backend for backend in checked if backend] == ["cuda", "triton"]
    assert calls == [("nnUNetTrainer", set(), True), ("nnUNetTrainerSegMambaV2 [cuda]", {"cuda"}, True),
                     ("nnUNetTrainerSegMambaV2 [triton]", {"triton"}, False),
                     ("nnUNetTrainerSegMambaV2NoMamba", set(), True)]
    out = capsys.readouterr().out
    compiled_rows = out[out.index("trainer (torch.compile)"):].splitlines()[2:5]
    assert [row.split()[0] for row in compiled_rows] == ["nnUNetTrainer", "nnUNetTrainerSegMambaV2",
                                                        "nnUNetTrainerSegMambaV2NoMamba"]
