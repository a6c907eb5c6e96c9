"""The statistics of `nnunet-segmamba compare`, from the long case table of `results.py` (a row per split,
dataset, method, fold, case and class): class and foreground means with their spread over cases and folds, ranks,
paired Wilcoxon tests against a baseline with Holm's correction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nnunet_segmamba.tools.results import BASE, CASE_KEYS, CompareError, Gap, Method, baselines

if TYPE_CHECKING:
    import pandas as pd


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


def build_comparison(rows: list[dict], gaps: list[Gap], splits: list[str], datasets: list[str],
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
