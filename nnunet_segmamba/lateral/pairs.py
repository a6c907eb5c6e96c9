"""Lateral label pairs ("kidney_left" / "kidney_right") from a dataset.json, and what a left-right flip swaps.

A pair is two label names whose words are the same except one, which is a side word in one and its opposite in
the other: left/right, l/r or lt/rt, in any case, as a prefix, a suffix or inside the name, with words separated
by '_', '-', '.', spaces or CamelCase. Words that merely contain the letters ("cleft", "bright") are no side words.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

PAIRS_KEY = "lateral_pairs"
"""dataset.json key that overrides detection: [["kidney_left", "kidney_right"], ...] by names or label values,
or [] for none."""

SIDE_WORDS = {"left": "right", "l": "r", "lt": "rt"}
_OPPOSITE = {**SIDE_WORDS, **{right: left for left, right in SIDE_WORDS.items()}}
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


class LateralLabelsError(ValueError):
    """A dataset's lateral labels cannot be used as given; the message says what to change."""


def words(name: str) -> tuple[str, ...]:
    """'Left-Cerebral-White-Matter' -> ('left', 'cerebral', 'white', 'matter'); 'kidneyL' -> ('kidney', 'l')."""
    return tuple(word.lower() for part in re.split(r"[\s_.\-]+", name) for word in _WORD.findall(part))


def mirrored_name_words(name: str) -> set[tuple[str, ...]]:
    """The word tuples of the names that would be `name`'s partner (one for each side word in it)."""
    split = words(name)
    return {split[:i] + (_OPPOSITE[w],) + split[i + 1:] for i, w in enumerate(split) if w in _OPPOSITE}


def find_name_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of `names` that differ only by a side word, each as (left name, right name), in the order of `names`.

    Raises LateralLabelsError when a name has several partners (declare the pairs with PAIRS_KEY)."""
    by_words: dict[tuple[str, ...], list[str]] = {}
    for name in names:
        by_words.setdefault(words(name), []).append(name)
    pairs, paired = [], set()
    for name in names:
        partners = [other for key in mirrored_name_words(name) for other in by_words.get(key, []) if other != name]
        if len(partners) > 1:
            raise LateralLabelsError(
                f"Label {name!r} could pair with each of {partners} as its other side; declare the pairs in "
                f"dataset.json, e.g. \"{PAIRS_KEY}\": [[{name!r}, {partners[0]!r}]] (or [] for none).")
        if partners and name not in paired:
            paired.update((name, partners[0]))
            pairs.append(_left_first(name, partners[0]))
    return pairs


def _left_first(a: str, b: str) -> tuple[str, str]:
    left = next((w for w in words(a) if w in _OPPOSITE), "")
    return (a, b) if left in SIDE_WORDS else (b, a)


def label_pairs(dataset_json: Mapping) -> list[tuple[int, int]]:
    """The label values a left-right flip swaps in a segmentation, from dataset.json.

    Detected from the label names, unless dataset.json declares PAIRS_KEY (names or values). Region-based
    datasets ('labels' holding lists): detected pairs need one label value per region; otherwise declare the
    segmentation values."""
    labels: Mapping[str, int | Sequence[int]] = dataset_json["labels"]
    values = {name: _single_value(value) for name, value in labels.items()}
    if PAIRS_KEY in dataset_json:
        pairs = [tuple(_declared_value(item, values, labels) for item in _pair(pair))
                 for pair in dataset_json[PAIRS_KEY]]
    else:
        pairs = []
        for left, right in find_name_pairs([name for name in labels if name != "background"]):
            if values[left] is None or values[right] is None:
                raise LateralLabelsError(
                    f"Regions {left!r} ({labels[left]}) and {right!r} ({labels[right]}) look like a left/right pair "
                    f"but are sets of labels: declare which segmentation values a left-right flip swaps, e.g. "
                    f"\"{PAIRS_KEY}\": [[1, 2]] in dataset.json (or [] for none).")
            pairs.append((values[left], values[right]))
    _check_disjoint(pairs, dataset_json)
    return pairs


def _single_value(value: int | Sequence[int]) -> int | None:
    if isinstance(value, int):
        return value
    return value[0] if len(value) == 1 else None


def _pair(pair) -> tuple:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise LateralLabelsError(f"dataset.json \"{PAIRS_KEY}\": each entry must be two labels, got {pair!r}.")
    return tuple(pair)


def _declared_value(item: str | int, values: Mapping[str, int | None], labels: Mapping) -> int:
    if isinstance(item, int) and not isinstance(item, bool):
        return item
    if item not in labels:
        raise LateralLabelsError(f"dataset.json \"{PAIRS_KEY}\" names {item!r}, which is not one of its labels "
                                 f"({', '.join(labels)}).")
    if values[item] is None:
        raise LateralLabelsError(f"dataset.json \"{PAIRS_KEY}\" names region {item!r} ({labels[item]}): give the "
                                 f"segmentation values a left-right flip swaps instead, e.g. [[1, 2]].")
    return values[item]


def _check_disjoint(pairs: list[tuple[int, int]], dataset_json: Mapping) -> None:
    ignore = dataset_json["labels"].get("ignore")
    seen: set[int] = set()
    for a, b in pairs:
        if a == b or {a, b} & seen or 0 in (a, b) or ignore in (a, b):
            raise LateralLabelsError(
                f"Lateral pair ({a}, {b}): a pair needs two different foreground labels, each in one pair only "
                f"(pairs so far: {sorted(seen)}); fix \"{PAIRS_KEY}\" in dataset.json.")
        seen |= {a, b}


def swap_labels(label: int, pairs: Sequence[tuple[int, int]]) -> int:
    for a, b in pairs:
        if label in (a, b):
            return b if label == a else a
    return label


def channel_pairs(pairs: Sequence[tuple[int, int]],
                  regions: Sequence[int | Sequence[int]] | None) -> list[tuple[int, int]]:
    """The network's output channels that a left-right flip swaps: the label values themselves, or for
    region-based training (sigmoid outputs, one per region in `regions`) the regions that map onto each other."""
    if regions is None:
        return list(pairs)
    regions = [(region,) if isinstance(region, int) else tuple(region) for region in regions]
    index = {frozenset(region): i for i, region in enumerate(regions)}
    swapped = []
    for i, region in enumerate(regions):
        j = index.get(frozenset(swap_labels(label, pairs) for label in region))
        if j is None:
            raise LateralLabelsError(
                f"Region {list(region)} has no mirror-image region among the dataset's regions once the lateral "
                f"pairs {list(pairs)} are swapped, so a left-right flip cannot be undone on the outputs: add that "
                f"region, or declare \"{PAIRS_KEY}\": [] in dataset.json (nnU-Net's mirroring).")
        if i < j:
            swapped.append((i, j))
    return swapped
