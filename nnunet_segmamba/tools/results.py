"""Collect nnU-Net results and compute the statistics of `nnunet-segmamba compare`.

Every fold's `validation/summary.json` (and, optionally, test-set predictions scored with nnU-Net's
`compute_metrics_on_folder`) becomes one long table with a row per split, dataset, method, fold, case and
class; everything else (class and foreground means with their spread, ranks, paired tests) is computed from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

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
    found = [fold for fold in folds if os.path.isfile(summaries[fold])]
    rows = [row for fold in found for row in case_rows(load_summary_json(summaries[fold]), split="cv",
                                                       dataset=dataset, method=method.name, fold=fold)]
    if not found:
        reason = "no fold has validation/summary.json" if os.path.isdir(folder) else f"not trained (no {folder})"
        return rows, [Gap("cv", dataset, method.name, reason)]
    missing = [fold for fold in folds if fold not in found]
    if missing:
        return rows, [Gap("cv", dataset, method.name,
                          f"fold {', '.join(missing)} missing (no fold_<k>/validation/summary.json): "
                          f"its numbers are over {len(found)} of {len(folds)} folds")]
    return rows, []


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


def case_foreground_dice(cases: pd.DataFrame) -> pd.DataFrame:
    """Per case: its foreground-mean Dice, the mean over its foreground classes (NaN classes skipped)."""
    return cases[cases["foreground"]].groupby(CASE_KEYS, sort=False)["Dice"].mean().reset_index()


def class_table(cases: pd.DataFrame) -> pd.DataFrame:
    """Per class: Dice mean over all cases of all folds pooled (what nnU-Net's cross-validation summary
    reports), its std over cases and over the per-fold means, and the cases with a Dice."""
    keys = [*BASE, "foreground", "label"]
    table = cases.groupby(keys, sort=False)["Dice"].agg(dice="mean", std_cases="std", cases="count")
    table["std_folds"] = fold_class_means(cases).groupby(keys).std()
    return table[["dice", "std_cases", "std_folds", "cases"]].reset_index()


def fold_class_means(cases: pd.DataFrame) -> pd.Series:
    return cases.groupby([*BASE, "foreground", "label", "fold"], sort=False)["Dice"].mean()


def foreground_table(cases: pd.DataFrame, case_fg: pd.DataFrame,
                     classes: pd.DataFrame) -> pd.DataFrame:
    """Per method and dataset: nnU-Net's foreground mean Dice (mean of the class means), its std over cases (of
    the case foreground-mean Dice) and over folds (of each fold's foreground mean), folds and cases found,
    and the rank within the dataset (1 = best, ties share the average rank)."""
    foreground = classes[classes["foreground"]]
    table = foreground.groupby(BASE, sort=False)["dice"].mean().to_frame()
    table["std_cases"] = case_fg.groupby(BASE)["Dice"].std()
    per_fold = fold_class_means(cases[cases["foreground"]]).groupby([*BASE, "fold"]).mean()
    table["std_folds"] = per_fold.groupby(BASE).std()
    table["folds"] = cases.groupby(BASE)["fold"].nunique()
    table["cases"] = case_fg.groupby(BASE)["case"].nunique()
    table["rank"] = table.groupby(["split", "dataset"])["dice"].rank(ascending=False, method="average")
    return table.reset_index()


def mean_ranks(foreground: pd.DataFrame) -> pd.DataFrame:
    """Per split and method: the mean of its per-dataset ranks, on how many datasets, and its mean Dice."""
    table = foreground.groupby(["split", "method"], sort=False).agg(
        mean_rank=("rank", "mean"), datasets=("rank", "count"), mean_dice=("dice", "mean"))
    return table.reset_index().sort_values(["split", "mean_rank"], kind="stable", ignore_index=True)


def holm(p: pd.Series) -> pd.Series:
    """Holm's step-down adjusted p-values of a Series; NaN entries are no test and stay NaN."""
    import numpy as np
    import pandas as pd

    tested = p.dropna().sort_values(kind="stable")
    steps = np.maximum.accumulate(tested.to_numpy() * np.arange(len(tested), 0, -1))
    return pd.Series(np.minimum(steps, 1.0), index=tested.index).reindex(p.index)


def wilcoxon(method_dice: pd.Series, baseline_dice: pd.Series) -> dict:
    """scipy's two-sided Wilcoxon signed-rank test (default zero handling and method) of paired values;
    no test (NaN) without pairs or when every difference is zero."""
    from scipy import stats

    differences = method_dice - baseline_dice
    if not differences.any():
        return {"statistic": float("nan"), "p": float("nan")}
    result = stats.wilcoxon(method_dice, baseline_dice)
    return {"statistic": float(result.statistic), "p": float(result.pvalue)}


def paired_tests(case_fg: pd.DataFrame, baseline_of: dict[str, str]) -> pd.DataFrame:
    """Each method against its baseline per split and dataset, on the case foreground-mean Dice of the cases
    both have; Holm's correction over all tests of a split."""
    import pandas as pd

    rows = []
    for (split, dataset), group in case_fg.groupby(["split", "dataset"], sort=False):
        wide = group.pivot(index="case", columns="method", values="Dice")
        for method, baseline in baseline_of.items():
            if method == baseline or method not in wide or baseline not in wide:
                continue
            pairs = wide[[method, baseline]].dropna()
            difference = pairs[method] - pairs[baseline]
            rows.append({"split": split, "dataset": dataset, "method": method, "baseline": baseline,
                         "pairs": len(pairs), "mean_diff": difference.mean(), "median_diff": difference.median(),
                         **wilcoxon(pairs[method], pairs[baseline])})
    columns = ["split", "dataset", "method", "baseline", "pairs", "mean_diff", "median_diff", "statistic", "p"]
    tests = pd.DataFrame(rows, columns=columns)
    tests["p_holm"] = tests.groupby("split")["p"].transform(holm) if rows else []
    return tests


@dataclass
class Comparison:
    """Everything `compare` reports. `overview` is the foreground table with each method's test against its
    baseline (`baseline_of`) and its network's parameters, and a row for every split, dataset and method asked
    for, found or not."""

    cases: pd.DataFrame
    case_fg: pd.DataFrame
    classes: pd.DataFrame
    overview: pd.DataFrame
    ranks: pd.DataFrame
    tests: pd.DataFrame
    baseline_of: dict[str, str]
    gaps: list[Gap]


def with_missing(foreground: pd.DataFrame, splits: list[str], datasets: list[str],
                 names: list[str]) -> pd.DataFrame:
    """The foreground table with a row (0 folds, 0 cases, no Dice) for every split, dataset and method asked for
    and not found."""
    import pandas as pd

    grid = pd.MultiIndex.from_product([splits, datasets, names], names=BASE)
    table = foreground.set_index(BASE).reindex(grid).reset_index()
    return table.fillna({"folds": 0, "cases": 0}).astype({"folds": int, "cases": int})


def check_folds_disjoint(cases: pd.DataFrame) -> None:
    """Cross-validation folds must not share cases (fold 'all' does with every other fold)."""
    repeated = cases[cases.duplicated([*BASE, "case", "label"], keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        folds = sorted(set(repeated.loc[repeated["case"] == first["case"], "fold"]))
        raise CompareError(f"case {first['case']} of {first['dataset']} / {first['method']} is in folds "
                           f"{', '.join(folds)}: compare folds that do not overlap (e.g. -f 0 1 2 3 4)")


def compare(rows: list[dict], gaps: list[Gap], splits: list[str], datasets: list[str],
            methods: list[Method], baseline: str, parameters: pd.DataFrame) -> Comparison:
    """All statistics from the collected case rows (at least one); `parameters` (`parameter_table`) joins the
    overview."""
    import pandas as pd

    cases = pd.DataFrame(rows)
    check_folds_disjoint(cases)
    case_fg = case_foreground_dice(cases)
    classes = class_table(cases)
    foreground = with_missing(foreground_table(cases, case_fg, classes), splits, datasets, [m.name for m in methods])
    baseline_of = baselines(methods, baseline)
    tests = paired_tests(case_fg, baseline_of)
    overview = foreground.merge(tests.drop(columns="baseline"), on=BASE, how="left").astype({"pairs": "Int64"})
    overview = overview.merge(parameters, on=["dataset", "method"], how="left")
    return Comparison(cases, case_fg, classes, overview, mean_ranks(foreground), tests, baseline_of, gaps)
