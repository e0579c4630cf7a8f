"""The statistics of an ablation report: tail means, t-intervals across seeds, paired differences.

An optimizer comparison at a handful of seeds is only worth reading with its uncertainty. Two rules:

- **Across seeds, a Student-t interval**: ``mean ± t(0.975, n-1) * sd / sqrt(n)`` with the sample standard
  deviation (``ddof=1``). With three seeds the t quantile is 4.30, not 1.96: a normal interval would claim twice the
  confidence the data holds. One seed has no interval (said as ``n=1``, never a zero-width one).
- **Against the baseline, paired by seed**: seed ``s`` of both optimizers saw the same initialisation and data order,
  so the per-seed difference cancels what the seed did to both, and its interval is usually far narrower than the
  two separate intervals suggest. Pairing is by seed *identity*, never by position: cells listed in a different
  order, or a seed missing on one side, must not pair seed 0 with seed 2.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its two-sided t-interval; ``half_width`` is None when ``n < 2``."""

    mean: float
    n: int
    half_width: float | None
    level: float = LEVEL

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def excludes_zero(self) -> bool | None:
        """Whether the interval lies wholly on one side of 0 (None without an interval)."""
        if self.half_width is None:
            return None
        return bool(self.low > 0 or self.high < 0)


def tail_mean(values: Sequence[float], fraction: float = 0.05) -> float | None:
    """Mean of the last ``fraction`` of ``values`` (at least one): a final loss less at the mercy of one batch."""
    if not values:
        return None
    count = max(1, math.ceil(len(values) * fraction))
    return float(np.mean(values[-count:]))


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval | None:
    """Mean and Student-t interval of ``values`` (None when there are none)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return None
    mean = float(data.mean())
    if data.size < 2:
        return Interval(mean, 1, None, level)
    sem = float(data.std(ddof=1)) / math.sqrt(data.size)
    quantile = float(scipy_stats.t.ppf(0.5 + level / 2, data.size - 1))
    return Interval(mean, int(data.size), quantile * sem, level)


@dataclass(frozen=True)
class PairedDifference:
    """``candidate - baseline`` per shared seed, with the interval of those differences."""

    seeds: tuple[Hashable, ...]
    differences: tuple[float, ...]
    interval: Interval | None


def paired_difference(
    candidate: Mapping[Hashable, float], baseline: Mapping[Hashable, float], level: float = LEVEL
) -> PairedDifference:
    """Differences over the seeds both sides have, matched by seed (sorted by seed for a stable order)."""
    shared = sorted_seeds(set(candidate) & set(baseline))
    differences = tuple(float(candidate[s]) - float(baseline[s]) for s in shared)
    return PairedDifference(tuple(shared), differences, t_interval(differences, level))


def sorted_seeds(seeds: set[Hashable]) -> list[Hashable]:
    """Seeds in their natural order (0, 1, 2, 10), or by their text when they do not compare."""
    try:
        return sorted(seeds)  # type: ignore[type-var]
    except TypeError:
        return sorted(seeds, key=repr)
