"""Inter-labeler agreement on items ranked by two or more labelers (InstructGPT reports ~73 %).

Two labelers who ranked the same K answers are compared on all C(K,2) answer pairs:

- **pairwise agreement** = concordant pairs / C(K,2): the share of answer pairs both ordered the
  same way (the figure InstructGPT reports);
- **Kendall's τ** = (concordant − discordant) / C(K,2), in −1..1. Rankings are strict (no ties),
  so per item τ = 2 · agreement − 1.

Aggregated per labeler pair and overall: the agreement is pooled over all answer pairs compared
(items with a larger K weigh more, like the reward model's pairs), τ is the mean of the per-item
τ (every item weighs the same). Pure Python, no store: `Labeling.agreement` feeds it.
"""

from __future__ import annotations

from itertools import combinations


def concordant_pairs(a: list[str], b: list[str]) -> tuple[int, int]:
    """(concordant, total) answer pairs between two strict orders of the same answers."""
    if len(a) != len(b) or set(a) != set(b) or len(set(a)) != len(a):
        raise ValueError("agreement compares two strict orders of the same distinct answers")
    where = {answer: i for i, answer in enumerate(b)}
    pairs = list(combinations(a, 2))  # (x, y) with x ranked above y in a
    return sum(where[x] < where[y] for x, y in pairs), len(pairs)


def pairwise_agreement(a: list[str], b: list[str]) -> float:
    concordant, total = concordant_pairs(a, b)
    return concordant / total


def kendall_tau(a: list[str], b: list[str]) -> float:
    concordant, total = concordant_pairs(a, b)
    return (2 * concordant - total) / total


def _summary(comparisons: list[tuple[int, int]]) -> dict:
    """Pooled agreement and mean τ over (concordant, total) comparisons (one per item and labeler pair)."""
    concordant = sum(c for c, _ in comparisons)
    total = sum(t for _, t in comparisons)
    return {
        "comparisons": len(comparisons),
        "answer_pairs": total,
        "agreement": concordant / total if total else None,
        "kendall_tau": sum((2 * c - t) / t for c, t in comparisons) / len(comparisons) if comparisons else None,
    }


def agreement_report(items: dict[object, dict[str, list[str]]]) -> dict:
    """`items`: item key -> {labeler: their order of the item's answers, best first}.

    Returns {"items": items ranked by >= 2 labelers, "overall": summary, "pairs": [summary per
    labeler pair, with "labelers": (a, b) and "items"], "labelers": [summary of each labeler
    against every other labeler]}. A summary holds comparisons, answer_pairs, agreement and
    kendall_tau (None where nothing was compared)."""
    by_pair: dict[tuple[str, str], list[tuple[int, int]]] = {}
    by_labeler: dict[str, list[tuple[int, int]]] = {}
    shared = 0
    for orders in items.values():
        if len(orders) < 2:
            continue
        shared += 1
        for x, y in combinations(sorted(orders), 2):
            counts = concordant_pairs(orders[x], orders[y])
            by_pair.setdefault((x, y), []).append(counts)
            by_labeler.setdefault(x, []).append(counts)
            by_labeler.setdefault(y, []).append(counts)
    overall = _summary([c for comparisons in by_pair.values() for c in comparisons])
    pairs = [{"labelers": pair, "items": len(comps), **_summary(comps)} for pair, comps in sorted(by_pair.items())]
    labelers = [{"labeler": name, **_summary(comps)} for name, comps in sorted(by_labeler.items())]
    return {"items": shared, "overall": overall, "pairs": pairs, "labelers": labelers}
