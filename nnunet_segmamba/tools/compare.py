"""`nnunet-segmamba compare`: compare trainers' nnU-Net results across datasets.

Reads each fold's validation summary under $nnUNet_results (and optionally scores test-set predictions),
prints a table and writes Markdown, CSV, JSON and plots: foreground and per-class Dice with their spread,
ranks per dataset and mean ranks, paired Wilcoxon tests against a baseline with Holm's correction, and each
network's parameter count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import textwrap
from typing import TYPE_CHECKING

from nnunet_segmamba.tools import results
from nnunet_segmamba.tools.comparison import Comparison, build_comparison
from nnunet_segmamba.tools.errors import FAILURE, USAGE, report
from nnunet_segmamba.tools.results import CompareError

if TYPE_CHECKING:
    import pandas as pd

SPLIT_TITLES = {"cv": "Cross-validation", "test": "Test set"}
COLUMNS = {"dataset": "dataset", "method": "method", "params_m": "params M", "folds": "folds", "cases": "cases",
           "dice": "Dice", "std_cases": "sd cases", "std_folds": "sd folds", "rank": "rank", "mean_diff": "Δ baseline",
           "pairs": "pairs", "p": "p", "p_holm": "p Holm"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[1]
    parser.add_argument("-d", dest="datasets", nargs="+", required=True, help="dataset ids or names")
    parser.add_argument("-tr", dest="trainers", nargs="+", required=True, help="trainer class names")
    parser.add_argument("-p", dest="plans", nargs="+", default=["nnUNetPlans"], help="plans identifiers")
    parser.add_argument("-c", dest="configurations", nargs="+", default=["3d_fullres"], help="configurations")
    parser.add_argument("-f", dest="folds", nargs="+", default=["0", "1", "2", "3", "4"],
                        help="the cross-validation folds expected (default: 0 1 2 3 4)")
    parser.add_argument("--baseline", default="nnUNetTrainer",
                        help="trainer the others are tested against (added to -tr if absent; default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level for the * mark")
    parser.add_argument("--test-predictions", metavar="TEMPLATE",
                        help="score test-set predictions: their folder, with fields {dataset} {trainer} {plans} "
                             "{configuration} {results} {raw}, e.g. '/preds/{dataset}/{trainer}'")
    parser.add_argument("--test-labels", metavar="TEMPLATE",
                        help=f"the test labels folder (same fields; default: {results.DEFAULT_TEST_LABELS})")
    parser.add_argument("-np", dest="num_processes", type=int,
                        help="processes for test-set scoring (default: nnU-Net's default_num_processes)")
    parser.add_argument("-o", dest="output", default="nnunet_segmamba_compare",
                        help="output folder (default: ./%(default)s)")


def main(args: argparse.Namespace) -> int:
    staging = None
    try:
        datasets, methods, splits = _check_arguments(args)
        staging = _staging_folder(os.path.abspath(args.output))
        comparison = _collect(args, datasets, methods, splits)
        written = _write_outputs(comparison, args, staging)
        _publish(staging, os.path.abspath(args.output), written)
        print(_terminal_report(comparison, args))
        print(f"\nWrote {len(written)} files to {os.path.abspath(args.output)}")
        return 0
    except CompareError as error:
        return report("compare", str(error), USAGE)
    except OSError as error:  # the outputs cannot be written after all (disk full)
        return report("compare", f"{error}; check the free space and permissions of {os.path.abspath(args.output)}",
                      FAILURE)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def _check_arguments(args: argparse.Namespace) -> tuple[list[str], list[results.Method], list[str]]:
    if args.test_labels and not args.test_predictions:
        raise CompareError("--test-labels needs --test-predictions (the folder of the predictions to score)")
    results.results_root()
    datasets = results.dataset_names(args.datasets)
    methods = results.make_methods(args.trainers, args.plans, args.configurations, args.baseline)
    for template in filter(None, (args.test_predictions, args.test_labels)):
        results.fill_template(template, datasets[0], methods[0])
    return datasets, methods, ["cv", "test"] if args.test_predictions else ["cv"]


def _staging_folder(output: str) -> str:
    """A temporary folder on the output's file system; the outputs move from it into place at the end."""
    existing = output
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise CompareError(f"output folder {output} is not writable ({existing} is not a writable folder)")
    try:
        return tempfile.mkdtemp(prefix=".nnunet_segmamba_compare-", dir=existing)
    except OSError as error:
        raise CompareError(f"output folder {output} is not writable: {error.strerror}") from None


def _publish(staging: str, output: str, written: list[str]) -> None:
    os.makedirs(output, exist_ok=True)
    for name in written:
        os.replace(os.path.join(staging, name), os.path.join(output, name))


def _collect(args: argparse.Namespace, datasets: list[str], methods: list[results.Method],
             splits: list[str]) -> Comparison:
    rows, gaps = results.collect_cross_validation(datasets, methods, args.folds)
    if args.test_predictions:
        test_rows, test_gaps = results.collect_test_sets(datasets, methods, args.test_predictions,
                                                         args.test_labels or results.DEFAULT_TEST_LABELS,
                                                         args.num_processes)
        rows, gaps = rows + test_rows, gaps + test_gaps
    if not rows:
        example = results.model_folder(datasets[0], methods[0])
        raise CompareError(f"no results found for datasets {' '.join(datasets)} and trainers "
                           f"{' '.join(dict.fromkeys(m.trainer for m in methods))} (e.g. no "
                           f"{example}/fold_<k>/validation/summary.json)")
    return build_comparison(rows, gaps, splits, datasets, methods, args.baseline,
                            results.parameter_table(datasets, methods))


def _select(table: pd.DataFrame, split: str, dataset: str | None = None) -> pd.DataFrame:
    """The rows of one split (and dataset)."""
    chosen = table["split"] == split
    return table[chosen & (table["dataset"] == dataset) if dataset else chosen]


def _number(value: float, spec: str = ".4f") -> str:
    """The value formatted, or "" for a missing one."""
    import pandas as pd

    return "" if pd.isna(value) else format(value, spec)


def _overview(comparison: Comparison, split: str, args: argparse.Namespace) -> pd.DataFrame:
    """The readable table of a split: one row per dataset and method."""
    table = _select(comparison.overview, split)
    shown = table.reindex(columns=list(COLUMNS)).astype(object)
    expected = len(args.folds)
    shown["folds"] = [f"{n}/{expected}" + (" !" if n < expected else "") if split == "cv" else "-"
                      for n in table["folds"]]
    for column in ("dice", "std_cases", "std_folds"):
        shown[column] = table[column].map(_number)
    shown["params_m"] = table["params_m"].map(lambda m: _number(m, ".1f"))
    shown["rank"] = table["rank"].map(lambda r: _number(r, "g"))
    is_baseline = table["method"].map(comparison.baseline_of) == table["method"]
    shown["mean_diff"] = table["mean_diff"].map(lambda d: _number(d, "+.4f")).where(~is_baseline, "baseline")
    shown["pairs"] = table["pairs"].map(lambda n: _number(n, ".0f"))
    shown["p"] = table["p"].map(lambda p: _number(p, ".2g"))
    shown["p_holm"] = [_number(p, ".2g") + (" *" if p < args.alpha else "") for p in table["p_holm"]]
    return shown.rename(columns=COLUMNS)


def _mean_ranks(comparison: Comparison, split: str) -> pd.DataFrame:
    ranks = _select(comparison.ranks, split)
    total = _select(comparison.overview, split)["dataset"].nunique()
    return ranks.assign(mean_rank=ranks["mean_rank"].map(lambda r: _number(r, ".2f")),
                        datasets=[f"{n}/{total}" + (" !" if n < total else "") for n in ranks["datasets"]],
                        mean_dice=ranks["mean_dice"].map(_number)).drop(columns="split").rename(
        columns={"mean_rank": "mean rank", "mean_dice": "mean Dice", "datasets": "ranked on"})


def _per_class(comparison: Comparison, split: str) -> pd.DataFrame:
    classes = _select(comparison.classes, split)
    return classes.assign(**{c: classes[c].map(_number) for c in ("dice", "std_cases", "std_folds")}).drop(
        columns=["split", "foreground"]).rename(columns=COLUMNS)


def _gap_lines(comparison: Comparison) -> list[str]:
    return [f"{SPLIT_TITLES[g.split]}: {g.dataset} / {g.method}: {g.reason}" for g in comparison.gaps]


def _statistics_note(comparison: Comparison, args: argparse.Namespace) -> str:
    tests = comparison.tests.groupby("split")["p"].count().to_dict()
    return (f"Dice: nnU-Net's foreground mean (mean over foreground classes of each class's mean Dice over all "
            f"cases of all folds found). sd cases: sample std of the case foreground-mean Dice (mean over the "
            f"case's classes, NaN classes skipped); sd folds: sample std of the folds' foreground means. "
            f"rank: within the dataset, 1 = best, ties averaged; mean rank over the datasets a method was ranked "
            f"on. cases: per class, those with a Dice (nnU-Net's Dice is NaN where the class is in neither reference "
            f"nor prediction). Δ baseline: mean paired difference of case foreground-mean Dice to {args.baseline} (same plans "
            f"and configuration) over the cases both have (pairs). p: two-sided Wilcoxon signed-rank test "
            f"(scipy.stats.wilcoxon, defaults) on those pairs; p Holm: Holm-corrected over all tests of the split "
            f"({', '.join(f'{SPLIT_TITLES[s]}: {n}' for s, n in tests.items()) or 'none'}); "
            f"* p Holm < {args.alpha}. '!' marks fewer folds or datasets than asked for (see Missing). params M: "
            f"millions of parameters of the network the trainer builds from the model folder's plans.json and "
            f"dataset.json; empty where those are missing or nnU-Net's trainer lookup does not find the trainer "
            f"(a trainer neither in nnunetv2 nor in this package needs nnUNet_extTrainer, as for nnUNetv2_predict).")


def _terminal_report(comparison: Comparison, args: argparse.Namespace) -> str:
    parts = []
    for split in comparison.overview["split"].unique():
        overview = _overview(comparison, split, args)
        overview.loc[overview["dataset"].duplicated(), "dataset"] = ""
        parts += [f"{SPLIT_TITLES[split]}: foreground Dice, baseline {args.baseline}",
                  overview.to_string(index=False), "",
                  f"Mean rank over datasets ({SPLIT_TITLES[split].lower()})",
                  _mean_ranks(comparison, split).to_string(index=False), ""]
    gaps = _gap_lines(comparison)
    parts += ["Missing:", *(f"  {line}" for line in gaps)] if gaps else ["Missing: nothing"]
    return "\n".join([*parts, "", textwrap.fill(_statistics_note(comparison, args), width=110)])


def _markdown_table(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _markdown_report(comparison: Comparison, args: argparse.Namespace, plots: list[str]) -> str:
    parts = ["# nnunet-segmamba compare", "",
             f"Datasets: {', '.join(comparison.overview['dataset'].unique())}; plans: {' '.join(args.plans)}; "
             f"configurations: {' '.join(args.configurations)}; folds: {' '.join(args.folds)}; "
             f"baseline: {args.baseline}.", ""]
    for split in comparison.overview["split"].unique():
        title = SPLIT_TITLES[split]
        parts += [f"## {title}", "", _markdown_table(_overview(comparison, split, args)), "",
                  "### Mean rank over datasets", "", _markdown_table(_mean_ranks(comparison, split)), "",
                  "### Per class", "", _markdown_table(_per_class(comparison, split)), ""]
        parts += [f"![{name}]({name})" for name in plots if name.startswith(f"{split}_")] + [""]
    gaps = _gap_lines(comparison)
    parts += ["## Missing", "", *(f"- {line}" for line in gaps or ["nothing"]), "",
              "## Statistics", "", _statistics_note(comparison, args), ""]
    return "\n".join(parts)


def _records(table: pd.DataFrame) -> list[dict]:
    """JSON-ready rows (NaN becomes null)."""
    return json.loads(table.to_json(orient="records", double_precision=15))


def _json_report(comparison: Comparison, args: argparse.Namespace) -> dict:
    from dataclasses import asdict

    settings = {key: getattr(args, key) for key in ("datasets", "trainers", "plans", "configurations", "folds",
                                                    "baseline", "alpha", "test_predictions", "test_labels")}
    return {"settings": settings, "statistics": _statistics_note(comparison, args),
            "overview": _records(comparison.overview), "per_class": _records(comparison.classes),
            "mean_ranks": _records(comparison.ranks), "tests": _records(comparison.tests),
            "missing": [asdict(gap) for gap in comparison.gaps]}


def _plot_cases(comparison: Comparison, split: str, dataset: str, expected_folds: int, path: str) -> None:
    """Box and strip plot of the case foreground-mean Dice of each method on one dataset; methods with fewer
    folds than expected say so under their name."""
    import seaborn as sns

    data = _select(comparison.case_fg, split, dataset)
    found = _select(comparison.overview, split, dataset).query("cases > 0")
    order = list(found["method"])
    figure, axes = _figure(1.6 + 1.3 * len(order), 4.5)
    sns.boxplot(data=data, x="method", y="Dice", order=order, color="lightsteelblue", showfliers=False, ax=axes)
    sns.stripplot(data=data, x="method", y="Dice", order=order, color="black", size=3, alpha=0.6, ax=axes)
    names = [m if split != "cv" or n == expected_folds else f"{m}\n({n}/{expected_folds} folds)"
             for m, n in zip(order, found["folds"])]
    axes.set_xticks(range(len(order)), names, rotation=25)
    axes.set(title=f"{dataset}: {SPLIT_TITLES[split].lower()}", xlabel="", ylabel="case foreground-mean Dice")
    _save(figure, path)


def _plot_overview(comparison: Comparison, split: str, path: str) -> None:
    """Heatmap of foreground Dice per dataset and method, annotated with the rank; grey cells are missing."""
    import seaborn as sns

    table = _select(comparison.overview, split)
    order = {"index": table["dataset"].unique(), "columns": table["method"].unique()}
    dice = table.pivot(index="dataset", columns="method", values="dice").reindex(**order)
    rank = table.pivot(index="dataset", columns="method", values="rank").reindex(**order)
    labels = dice.map(_number) + rank.map(lambda r: _number(r, "g")).radd("\n#").where(rank.notna(), "")
    figure, axes = _figure(2.5 + 1.5 * dice.shape[1], 1.5 + 0.7 * dice.shape[0])
    sns.heatmap(dice, annot=labels, fmt="", cmap="viridis", cbar_kws={"label": "foreground Dice"}, ax=axes)
    axes.set_facecolor("0.9")
    for row, column in zip(*dice.isna().to_numpy().nonzero()):
        axes.text(column + 0.5, row + 0.5, "missing", ha="center", va="center", color="0.4")
    axes.set(title=f"{SPLIT_TITLES[split]}: foreground Dice (#rank)", xlabel="", ylabel="")
    axes.tick_params(axis="x", labelrotation=25)
    _save(figure, path)


def _figure(width: float, height: float) -> tuple:
    """A figure with one axes, outside pyplot: it renders with Agg and leaves the global backend alone."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def _save(figure, path: str) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _write_plots(comparison: Comparison, expected_folds: int, folder: str) -> list[str]:
    names = []
    for split in comparison.overview["split"].unique():
        names.append(f"{split}_overview.png")
        _plot_overview(comparison, split, os.path.join(folder, names[-1]))
        for dataset in _select(comparison.case_fg, split)["dataset"].unique():
            names.append(f"{split}_dice_per_case_{dataset}.png")
            _plot_cases(comparison, split, dataset, expected_folds, os.path.join(folder, names[-1]))
    return names


def _write_outputs(comparison: Comparison, args: argparse.Namespace, folder: str) -> list[str]:
    """All files into `folder`; returns their names."""
    plots = _write_plots(comparison, len(args.folds), folder)
    tables = {"overview.csv": comparison.overview, "per_class.csv": comparison.classes,
              "per_case.csv": comparison.cases, "mean_ranks.csv": comparison.ranks, "tests.csv": comparison.tests}
    for name, table in tables.items():
        table.to_csv(os.path.join(folder, name), index=False)
    with open(os.path.join(folder, "compare.json"), "w") as file:
        json.dump(_json_report(comparison, args), file, indent=2)
    with open(os.path.join(folder, "compare.md"), "w") as file:
        file.write(_markdown_report(comparison, args, plots))
    return [*plots, *tables, "compare.json", "compare.md"]
