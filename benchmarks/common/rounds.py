"""Interleaved rounds and their medians.

On a shared machine the speed of the disk and the CPU drifts over minutes. Running variant A
three times and then variant B three times turns that drift into a difference between A and B.
Instead every round runs each variant once, in an order rotated by one place per round, and the
result of each variant is the median over the rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def rotate(xs: Sequence[T], k: int) -> list[T]:
    """``xs`` rotated left by ``k`` places (``k`` taken modulo the length)."""
    xs = list(xs)
    if not xs:
        return xs
    k %= len(xs)
    return xs[k:] + xs[:k]


def median(xs: Sequence[float | None]) -> float | None:
    """The median of the values that are not None; None when there are none."""
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def medians(results: dict[str, list[float | None]]) -> dict[str, float | None]:
    """``median`` of each variant's list of values."""
    return {k: median(v) for k, v in results.items()}


def interleaved_rounds(variants: Sequence[str], reps: int, run: Callable[[str, int], R],
                       ) -> dict[str, list[R]]:
    """Run every variant once per round for ``reps`` rounds, in ``rotate(variants, round)``
    order, and return each variant's results in round order.

    ``run(variant, round)`` does one measurement and returns its result (e.g. seconds). With two
    variants the order alternates: A B, B A, A B, ...
    """
    results: dict[str, list[R]] = {v: [] for v in variants}
    for rep in range(reps):
        for name in rotate(variants, rep):
            results[name].append(run(name, rep))
    return results
