"""Paired comparisons of two training recipes (arms) over seeds and test cases, and convergence speed.

Conventions:

- A comparison table is ``[n_seeds, n_cases]``: entry ``(s, c)`` is a per-case metric (e.g. the mean Dice over
  classes of test case ``c``) of the run with seed ``s``. Both arms share seeds and cases (paired design); NaN marks a
  missing value (e.g. HD95 of a missed structure), and a pair with a NaN on either side is left out.
- The effect is ``mean over seeds of (mean over cases of arm A - arm B)``.
- Its 95 % confidence interval comes from a *two-way paired percentile bootstrap*: every resample draws seeds and test
  cases independently with replacement (seeds and cases are crossed: every seed sees every case) and recomputes the
  effect on the paired differences; the interval is the 2.5th to 97.5th percentile of 10,000 resamples. It covers
  both sources of variation a user meets: another seed and other test cases. With few seeds it is optimistic, as
  every bootstrap interval is; the number of seeds is reported with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
CI_LEVEL = 0.95
#: the method, as reports name it
CI_METHOD = (f"two-way (seeds x test cases) paired percentile bootstrap, {BOOTSTRAP_RESAMPLES:,} resamples, "
             f"{CI_LEVEL:.0%} interval")


@dataclass(frozen=True)
class PairedEffect:
    effect: float  # mean over seeds of the per-seed mean paired difference (A - B)
    low: float
    high: float
    n_seeds: int
    n_cases: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _effect(diff: np.ndarray) -> float:
    """Mean over seeds of the mean over cases; seeds without any valid pair are skipped."""
    per_seed = [np.nanmean(row) for row in diff if np.isfinite(row).any()]
    return float(np.mean(per_seed)) if per_seed else float("nan")


def paired_effect(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], resamples: int = BOOTSTRAP_RESAMPLES,
                  level: float = CI_LEVEL, seed: int = 0) -> PairedEffect:
    """Effect of A over B and its bootstrap confidence interval (see the module docstring)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired tables must both be [n_seeds, n_cases], got {a.shape} and {b.shape}")
    diff = a - b  # NaN where either side is missing
    n_seeds, n_cases = diff.shape
    point = _effect(diff)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    cases = rng.integers(0, n_cases, size=(resamples, n_cases))
    boot = np.array([_effect(diff[np.ix_(s, c)]) for s, c in zip(seeds, cases)])
    boot = boot[np.isfinite(boot)]
    tail = 100 * (1 - level) / 2
    low, high = (np.percentile(boot, [tail, 100 - tail]) if boot.size else (float("nan"), float("nan")))
    return PairedEffect(point, float(low), float(high), n_seeds, n_cases)


def iterations_to_reach(curve: Sequence[float], target: float, iterations_per_epoch: int) -> int | None:
    """Training iterations after which a per-epoch validation curve first reaches ``target`` (None: never)."""
    for epoch, value in enumerate(curve):
        if value is not None and np.isfinite(value) and value >= target:
            return (epoch + 1) * iterations_per_epoch
    return None
