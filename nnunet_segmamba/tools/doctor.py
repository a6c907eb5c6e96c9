"""`nnunet-segmamba doctor`: is this machine ready to train our networks with nnU-Net's commands?

Prints one line per check (ok / warn / FAIL) with advice, and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import os
import platform
from dataclasses import dataclass
from importlib import metadata

from nnunet_segmamba.tools.environment import EXT_TRAINER_ENV, export_line, find_trainer, hook_paths, trainers_folder
from nnunet_segmamba.tools.errors import FAILURE, report

NNUNET_RANGE = ((2, 8, 1), (2, 9, 0))
PROBE_TRAINER = "nnUNetTrainerSegMambaV2"


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "FAIL"
    detail: str
    advice: str = ""


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_versions() -> list[Check]:
    import torch

    checks = [Check("python", "ok", platform.python_version())]
    cuda = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    checks.append(Check("torch", "ok", f"{torch.__version__} ({cuda})"))
    nnunet = _version("nnunetv2")
    if nnunet is None:
        checks.append(Check("nnunetv2", "FAIL", "not installed", "pip install 'nnunetv2>=2.8.1,<2.9'"))
    elif not NNUNET_RANGE[0] <= _release(nnunet) < NNUNET_RANGE[1]:
        checks.append(Check("nnunetv2", "FAIL", f"{nnunet}; this release needs >=2.8.1,<2.9 (nnUNet_extTrainer, "
                                                "the 2.7+ trainer API)", "pip install 'nnunetv2>=2.8.1,<2.9'"))
    else:
        checks.append(Check("nnunetv2", "ok", nnunet))
    checks.append(Check("dynamic-network-architectures", "ok" if _version("dynamic_network_architectures") else "FAIL",
                        _version("dynamic_network_architectures") or "not installed",
                        "" if _version("dynamic_network_architectures") else "pip install dynamic-network-architectures"))
    return checks


def check_tools() -> Check:
    """Every tool of `nnunet-segmamba` imports (the sweep needs submitit, compare scipy and pandas, ...)."""
    from nnunet_segmamba.cli import import_tools

    modules, broken = import_tools()
    if broken:
        return Check("tools", "FAIL", "; ".join(f"{name}: {error}" for name, error in broken.items()),
                     "`pip install .` in the nnunet-segmamba checkout installs every dependency again "
                     "(README: Install)")
    return Check("tools", "ok", f"all {len(modules)} import")


def check_gpu_and_kernels() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        return [Check("GPU", "warn", "no CUDA GPU visible: training runs on the CPU (fine for tests and the "
                                     "demo, too slow for real datasets)")]
    name = torch.cuda.get_device_name(0)
    capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
    checks = [Check("GPU", "ok", f"{name} (sm {capability}, bf16: {torch.cuda.is_bf16_supported()}, "
                                 f"{torch.cuda.device_count()} visible)")]
    for distribution in ("mamba_ssm", "causal_conv1d"):
        version = _version(distribution)
        checks.append(Check(distribution.replace("_", "-"), "ok" if version else "warn", version or "not installed",
                            "" if version else "pip install --no-build-isolation mamba-ssm causal-conv1d "
                                               "(README: GPU install); without them our Triton scan runs (see "
                                               "'scan backend' below; README: Scan backends)"))
    return checks


def check_scan_backend() -> Check:
    """Which backend runs, and a small scan through it against the float64 sequential reference."""
    import warnings

    import torch

    from nnunet_segmamba.mamba import describe_backend, scan_ops
    from nnunet_segmamba.mamba.reference import selective_scan_reference

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = describe_backend(device)
            ops = scan_ops(device)
    except (RuntimeError, ValueError) as error:
        return Check("scan backend", "FAIL", str(error), "unset NNUNET_SEGMAMBA_SCAN or fix the kernels")
    generator = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(2, 8, 300, generator=generator, dtype=torch.float64) for _ in range(3))
    A = -torch.rand(8, 16, generator=generator, dtype=torch.float64) - 0.5
    B, C = (torch.randn(2, 16, 300, generator=generator, dtype=torch.float64) for _ in range(2))
    D = torch.randn(8, generator=generator, dtype=torch.float64)
    reference = selective_scan_reference(u, delta, A, B, C, D, z, delta_softplus=True)
    inputs = [t.float().to(device) for t in (u, delta, A, B, C, D, z)]
    result = ops.selective_scan(*inputs[:6], z=inputs[6], delta_softplus=True).double().cpu()
    error = ((result - reference).norm() / reference.norm()).item()
    status = "ok" if error < 1e-4 else "FAIL"
    detail = f"{line}; self-test vs float64 reference: relative error {error:.1e}"
    if caught:
        status = "warn" if status == "ok" else status
        detail += "; " + "; ".join(str(w.message) for w in caught)
    return Check("scan backend", status, detail, "" if error < 1e-4 else "report this: the scan is wrong here")


def check_compile() -> Check:
    """nnUNetv2_train compiles by default on CUDA (our trainers too): can the compiled scan's Triton kernels run?"""
    import torch

    from nnunet_segmamba.mamba import backends
    from nnunet_segmamba.training.base import compile_requested

    value = os.environ.get("nnUNet_compile")
    if not torch.cuda.is_available():
        return Check("torch.compile", "ok", "off here: nnU-Net compiles only on CUDA")
    if value is not None and not compile_requested():
        return Check("torch.compile", "ok", f"off (nnUNet_compile={value}): eager training")
    ops, reason = backends.GPU_OPS[backends.COMPILED_BACKEND](0)
    if ops is None:
        return Check("torch.compile", "FAIL", f"on (nnU-Net's default), but {reason}",
                     "export nnUNet_compile=0 (eager training), or make Triton run: it ships with the Linux CUDA "
                     "wheels of torch and needs a C compiler (e.g. apt install gcc)")
    return Check("torch.compile", "ok", f"on (nnU-Net's default; nnUNet_compile=0 turns it off): the Mamba layers "
                                        f"compile with the {backends.COMPILED_BACKEND} scan")


def check_paths() -> list[Check]:
    checks = []
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(variable)
        if not value:
            checks.append(Check(variable, "FAIL", "not set", f"export {variable}=/path/to/{variable} "
                                                            "(nnU-Net's documentation/setting_up_paths.md)"))
        elif not os.path.isdir(value):
            checks.append(Check(variable, "warn", f"{value} does not exist yet", f"mkdir -p {value}"))
        elif not os.access(value, os.W_OK):
            checks.append(Check(variable, "FAIL", f"{value} is not writable", "choose a folder you can write"))
        else:
            checks.append(Check(variable, "ok", value))
    return checks


def check_trainer_hook() -> list[Check]:
    ours, listed = trainers_folder(), hook_paths()
    fix = f'eval "$(nnunet-segmamba env)"   # sets: {export_line()}'
    if not listed:
        return [Check(EXT_TRAINER_ENV, "FAIL", "not set: nnUNetv2_train/predict will say 'Could not find "
                                               "requested nnunet trainer'", fix)]
    if ours not in listed:
        return [Check(EXT_TRAINER_ENV, "FAIL", f"lists {os.pathsep.join(listed)} but not this installation's "
                                               f"trainers folder {ours}", fix)]
    checks = [Check(EXT_TRAINER_ENV, "ok", os.pathsep.join(listed))]
    missing = [p for p in listed if not os.path.isdir(p)]
    if missing:
        checks.append(Check(EXT_TRAINER_ENV, "warn", f"lists folders that do not exist: {missing}",
                            "remove them from the variable"))
    try:
        found = find_trainer(PROBE_TRAINER)
        checks.append(Check("trainer lookup", "ok", f"nnU-Net finds {PROBE_TRAINER} ({found.__module__})"))
    except Exception as error:
        checks.append(Check("trainer lookup", "FAIL", f"nnU-Net's lookup of {PROBE_TRAINER} failed: {error}", fix))
    return checks


def check_lateral_labels(dataset: str, plans_identifier: str, configuration: str) -> Check:
    """What our trainers will do with a dataset's left/right label pairs (nnunet_segmamba.lateral)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_segmamba.lateral.axis import read_case_properties
    from nnunet_segmamba.lateral.mirroring import MODE_VARIABLE, detect, requested_mode
    from nnunet_segmamba.lateral.pairs import label_pairs

    name = f"lateral labels ({dataset})"
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
        folder = os.path.join(os.environ.get("nnUNet_preprocessed", ""), dataset_name)
        plans_file = os.path.join(folder, f"{plans_identifier}.json")
        mode = requested_mode()
        if not os.path.isfile(plans_file):
            raw = load_json(os.path.join(os.environ.get("nnUNet_raw", ""), dataset_name, "dataset.json"))
            pairs = label_pairs(raw)
            return Check(name, "warn", f"pairs {pairs or 'none'}; the left-right axis is read from the preprocessed "
                                       f"cases", f"nnUNetv2_plan_and_preprocess -d {dataset}, then doctor again")
        plans, dataset_json = PlansManager(plans_file), load_json(os.path.join(folder, "dataset.json"))
        manager = plans.get_configuration(configuration)
        labels = plans.get_label_manager(dataset_json)
        cases = os.path.join(folder, manager.data_identifier)
        lateral = detect(dataset_json, plans.plans, lambda: read_case_properties(cases),
                         labels.foreground_regions if labels.has_regions else None, mode)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        return Check(name, "FAIL", str(error))
    if lateral is None:
        return Check(name, "ok", f"none ({MODE_VARIABLE}={mode}): nnU-Net's mirroring")
    names = {v: k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    pairs = ", ".join(f"{names.get(a, a)}<->{names.get(b, b)}" for a, b in lateral.label_pairs)
    return Check(name, "ok", f"{pairs}; {lateral.describe(len(manager.patch_size))} of {configuration}, from the "
                             f"geometry of the preprocessed cases ({MODE_VARIABLE}=exclude|swap|off)")


def run_checks() -> list[Check]:
    # the trainer lookup first: nnU-Net's lookup breaks once mamba_ssm has imported transformers (see find_trainer)
    hook = check_trainer_hook()
    return [*check_versions(), check_tools(), *check_gpu_and_kernels(), check_scan_backend(), check_compile(),
            *check_paths(), *hook]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0].split(": ", 1)[1]
    parser.add_argument("-d", "--dataset", help="also report a dataset's left/right label pairs and left-right axis "
                                                "(name or id; preprocessed: nnUNet_preprocessed)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")


def main(args: argparse.Namespace) -> int:
    checks = run_checks()
    if args.dataset:
        checks.append(check_lateral_labels(args.dataset, args.plans, args.configuration))
    width = max(len(c.name) for c in checks)
    for check in checks:
        print(f"[{check.status:>4}] {check.name:<{width}}  {check.detail}")
        if check.advice and check.status != "ok":
            print(f"       {'':<{width}}  -> {check.advice}")
    failed = [c.name for c in checks if c.status == "FAIL"]
    if not failed:
        print("\nAll checks passed.")
        return 0
    return report("doctor", f"{len(failed)} problem(s): {', '.join(failed)}; fix them as the '->' lines above say",
                  FAILURE)
