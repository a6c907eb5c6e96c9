"""Collect nnU-Net results for `nnunet-segmamba compare`.

Every fold's `validation/summary.json` (and, optionally, test-set predictions scored with nnU-Net's
`compute_metrics_on_folder`) becomes one long table with a row per split, dataset, method, fold, case and
class; `comparison.py` computes the statistics from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nnunet_segmamba.tools.fold_results import fold_has_results

if TYPE_CHECKING:
    import pandas as pd

BASE = ["split", "dataset", "method"]
CASE_KEYS = [*BASE, "fold", "case"]
DEFAULT_TEST_LABELS = "{raw}/{dataset}/labelsTs"


class CompareError(Exception):
    """A bad argument or missing input: `compare` prints it as one line and exits with code 2."""


@dataclass(frozen=True)
class Method:
    """One kind of trained model: a trainer with its plans and configuration, and the name tables give it."""

    trainer: str
    plans: str
    configuration: str
    name: str


@dataclass(frozen=True)
class Gap:
    """Something that was asked for and is missing, entirely or partly."""

    split: str
    dataset: str
    method: str
    reason: str


def results_root() -> str:
    """$nnUNet_results, which must be an existing folder."""
    from nnunetv2.paths import nnUNet_results

    root = nnUNet_results.get()
    if not root:
        raise CompareError("nnUNet_results is not set: export nnUNet_results=/path/to/nnUNet_results")
    if not os.path.isdir(root):
        raise CompareError(f"nnUNet_results={root} is not a folder")
    return root


def dataset_names(given: list[str]) -> list[str]:
    """nnU-Net's DatasetXXX_Name for each id or name (duplicates dropped)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    names = []
    for dataset in dict.fromkeys(given):
        try:
            names.append(str(maybe_convert_to_dataset_name(dataset)))
        except (RuntimeError, ValueError) as error:
            raise CompareError(f"unknown dataset {dataset!r}: {str(error).split('. ')[0]}") from None
    return names


def make_methods(trainers: list[str], plans: list[str], configurations: list[str], baseline: str) -> list[Method]:
    """Every trainer x plans x configuration, baseline trainer first; named by the trainer alone when only one
    plans and one configuration are compared, else by nnU-Net's trainer__plans__configuration."""
    from nnunetv2.utilities.file_path_utilities import convert_trainer_plans_config_to_identifier

    single = len(set(plans)) == 1 and len(set(configurations)) == 1
    methods = []
    for trainer in dict.fromkeys([baseline, *trainers]):
        for plan in dict.fromkeys(plans):
            for configuration in dict.fromkeys(configurations):
                name = trainer if single else convert_trainer_plans_config_to_identifier(trainer, plan, configuration)
                methods.append(Method(trainer, plan, configuration, name))
    return methods


def baselines(methods: list[Method], baseline: str) -> dict[str, str]:
    """Each method's name -> the name of the baseline trainer's method with the same plans and configuration."""
    by_setting = {(m.plans, m.configuration): m.name for m in methods if m.trainer == baseline}
    return {m.name: by_setting[(m.plans, m.configuration)] for m in methods}


def model_folder(dataset: str, method: Method) -> str:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return get_output_folder(dataset, method.trainer, method.plans, method.configuration)


def parameter_count(model_folder: str, trainer_name: str, configuration: str) -> float | None:
    """Millions of parameters of the network that `trainer_name` builds from the model folder's plans.json and
    dataset.json for `configuration` (as nnUNetv2_predict does, without deep supervision); None when those files
    or the configuration are missing, or nnU-Net's trainer lookup (its folder, then nnUNet_extTrainer) does not
    find the trainer."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_segmamba.tools.environment import find_trainer

    plans_json, dataset_json = (os.path.join(model_folder, f) for f in ("plans.json", "dataset.json"))
    if not (os.path.isfile(plans_json) and os.path.isfile(dataset_json)):
        return None
    plans, dataset = PlansManager(plans_json), load_json(dataset_json)
    if configuration not in plans.available_configurations:
        return None
    try:
        trainer = find_trainer(trainer_name)
    except RuntimeError:
        return None
    manager = plans.get_configuration(configuration)
    network = trainer.build_network_architecture(plans, manager,
                                                 determine_num_input_channels(plans, manager, dataset),
                                                 plans.get_label_manager(dataset).num_segmentation_heads, False)
    return sum(p.numel() for p in network.parameters()) / 1e6


def parameter_table(datasets: list[str], methods: list[Method]) -> pd.DataFrame:
    """Per dataset and method: `params_m`, its network's millions of parameters (NaN where unknown)."""
    import pandas as pd

    rows = [{"dataset": dataset, "method": method.name,
             "params_m": parameter_count(model_folder(dataset, method), method.trainer, method.configuration)}
            for dataset in datasets for method in methods]
    return pd.DataFrame(rows, columns=["dataset", "method", "params_m"]).astype({"params_m": float})


def _case_name(file: str) -> str:
    name = os.path.basename(file)
    return name[:-len(".nii.gz")] if name.endswith(".nii.gz") else os.path.splitext(name)[0]


def case_rows(summary: dict, **ids: str) -> list[dict]:
    """One row per case and class of an nnU-Net summary (as `load_summary_json` or `compute_metrics_on_folder`
    return it: class keys are labels or region tuples); `foreground` is False only for label 0."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    return [{**ids, "case": _case_name(entry["reference_file"]), "label": label_or_region_to_key(key),
             "foreground": key != 0, **metrics}
            for entry in summary["metric_per_case"] for key, metrics in entry["metrics"].items()]


def collect_method(dataset: str, method: Method, folds: list[str]) -> tuple[list[dict], list[Gap]]:
    """The case rows of one model's cross-validation folds, and what is missing of it."""
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    folder = model_folder(dataset, method)
    summaries = {fold: os.path.join(folder, f"fold_{fold}", "validation", "summary.json") for fold in folds}
    found = [fold for fold in folds if fold_has_results(Path(folder) / f"fold_{fold}")]
    incomplete = [fold for fold in folds if fold not in found and os.path.isfile(summaries[fold])]
    rows = [row for fold in found for row in case_rows(load_summary_json(summaries[fold]), split="cv",
                                                       dataset=dataset, method=method.name, fold=fold)]
    gaps = [Gap("cv", dataset, method.name, f"fold {fold}'s validation/summary.json is incomplete (its training "
                                            f"stopped while writing it): validate it again (nnUNetv2_train ... "
                                            f"--val, or --c while its checkpoints are there)") for fold in incomplete]
    if not found:
        reason = "no fold has validation/summary.json" if os.path.isdir(folder) else f"not trained (no {folder})"
        return rows, gaps + [Gap("cv", dataset, method.name, reason)]
    missing = [fold for fold in folds if fold not in found]
    if missing:
        gaps.append(Gap("cv", dataset, method.name,
                        f"fold {', '.join(missing)} missing (no fold_<k>/validation/summary.json): "
                        f"its numbers are over {len(found)} of {len(folds)} folds"))
    return rows, gaps


def collect_cross_validation(datasets: list[str], methods: list[Method],
                             folds: list[str]) -> tuple[list[dict], list[Gap]]:
    rows, gaps = [], []
    for dataset in datasets:
        if not os.path.isdir(os.path.join(results_root(), dataset)):
            gaps.append(Gap("cv", dataset, "all trainers", "no results folder in nnUNet_results"))
            continue
        for method in methods:
            method_rows, method_gaps = collect_method(dataset, method, folds)
            rows += method_rows
            gaps += method_gaps
    return rows, gaps


def fill_template(template: str, dataset: str, method: Method) -> str:
    """A --test-predictions/--test-labels path with its {fields} filled in."""
    from nnunetv2.paths import nnUNet_raw

    fields = {"dataset": dataset, "trainer": method.trainer, "plans": method.plans,
              "configuration": method.configuration, "results": results_root()}
    if nnUNet_raw.get():
        fields["raw"] = nnUNet_raw.get()
    try:
        return template.format(**fields)
    except KeyError as error:
        raise CompareError(f"{template!r}: unknown field {{{error.args[0]}}} (known: "
                           f"{', '.join(sorted(fields))}; {{raw}} needs nnUNet_raw set)") from None
    except (IndexError, ValueError) as error:
        raise CompareError(f"{template!r}: not a valid path template ({error})") from None


def _files(folder: str, ending: str) -> set[str]:
    from batchgenerators.utilities.file_and_folder_operations import subfiles

    return set(subfiles(folder, suffix=ending, join=False))


def _unscorable(predictions: str, labels: str, model: str, ending: str | None) -> str | None:
    """Why a test set cannot be scored, or None."""
    if not os.path.isdir(predictions):
        return f"no test predictions folder {predictions}"
    if not os.path.isdir(labels):
        return f"no test labels folder {labels}"
    if ending is None:
        return f"no dataset.json and plans.json in {model} (nnU-Net needs them to read the labels)"
    if not _files(predictions, ending):
        return f"no *{ending} predictions in {predictions}"
    unlabelled = sorted(_files(predictions, ending) - _files(labels, ending))
    if unlabelled:
        return f"{len(unlabelled)} predictions have no label in {labels} (e.g. {unlabelled[0]}): not scored"
    return None


def score_test_set(dataset: str, method: Method, predictions: str, labels: str,
                   num_processes: int) -> tuple[list[dict], list[Gap]]:
    """Case rows of one model's test predictions scored by nnU-Net's `compute_metrics_on_folder`, with the
    labels, reader and ignore label that the model's dataset.json and plans.json define."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model = model_folder(dataset, method)
    dataset_json, plans_json = (os.path.join(model, f) for f in ("dataset.json", "plans.json"))
    has_json = os.path.isfile(dataset_json) and os.path.isfile(plans_json)
    ending = load_json(dataset_json)["file_ending"] if has_json else None
    problem = _unscorable(predictions, labels, model, ending)
    if problem:
        return [], [Gap("test", dataset, method.name, problem)]
    plans = PlansManager(plans_json)
    manager = plans.get_label_manager(load_json(dataset_json))
    summary = compute_metrics_on_folder(labels, predictions, None, plans.image_reader_writer_class(), ending,
                                        manager.foreground_regions if manager.has_regions else
                                        manager.foreground_labels, manager.ignore_label, num_processes)
    rows = case_rows(summary, split="test", dataset=dataset, method=method.name, fold="test")
    labelled, predicted = len(_files(labels, ending)), len(_files(predictions, ending))
    if labelled == predicted:
        return rows, []
    return rows, [Gap("test", dataset, method.name, f"{labelled - predicted} of {labelled} test cases have no "
                                                    f"prediction: its numbers are over {predicted} cases")]


def collect_test_sets(datasets: list[str], methods: list[Method], predictions: str, labels: str,
                      num_processes: int | None) -> tuple[list[dict], list[Gap]]:
    """Case rows of every model's test predictions (folders from the path templates); None processes: nnU-Net's
    default_num_processes."""
    from nnunetv2.configuration import default_num_processes

    num_processes = num_processes or default_num_processes
    rows, gaps = [], []
    for dataset in datasets:
        for method in methods:
            method_rows, method_gaps = score_test_set(dataset, method, fill_template(predictions, dataset, method),
                                                      fill_template(labels, dataset, method), num_processes)
            rows += method_rows
            gaps += method_gaps
    return rows, gaps
