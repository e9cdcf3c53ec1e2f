"""The study's statistics on hand-made tables: effect, bootstrap interval, convergence."""
import math

import numpy as np
import pytest

from nnunet_mim.core.statistics import iterations_to_reach, paired_effect


def test_constant_difference_has_a_degenerate_interval():
    a = np.full((3, 5), 0.8)
    e = paired_effect(a, a - 0.05)
    assert e.effect == pytest.approx(0.05) and e.low == pytest.approx(0.05) and e.high == pytest.approx(0.05)
    assert e.excludes_zero and (e.n_seeds, e.n_cases) == (3, 5)


def test_interval_of_a_two_case_table_is_the_exact_bootstrap_distribution():
    """One seed, differences [0, 1]: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 95 %
    percentile interval is [0, 1] and the point estimate 0.5."""
    e = paired_effect([[1.0, 2.0]], [[1.0, 1.0]])
    assert (e.effect, e.low, e.high) == (0.5, 0.0, 1.0) and not e.excludes_zero


def test_pairing_removes_the_between_case_spread():
    """Cases differ a lot, the arms differ by the same small amount on every case: an unpaired analysis would not
    see it, the paired one does."""
    rng = np.random.default_rng(0)
    scratch = rng.uniform(0.3, 0.9, size=(3, 10))
    e = paired_effect(scratch + 0.02, scratch)
    assert e.effect == pytest.approx(0.02) and e.low > 0


def test_effect_is_the_mean_over_seeds_of_the_mean_over_cases_and_skips_missing_pairs():
    a = [[0.9, math.nan, 0.7], [0.6, 0.6, 0.6]]
    b = [[0.8, 0.5, 0.5], [0.6, 0.6, 0.3]]
    # seed 0: pairs (0.1, 0.2) -> 0.15 (the NaN pair is left out); seed 1: (0, 0, 0.3) -> 0.1
    assert paired_effect(a, b).effect == pytest.approx(0.125)
    noise = np.random.default_rng(1).normal(0, 0.05, size=(3, 10))
    e = paired_effect(0.5 + noise, np.full((3, 10), 0.5))
    assert e.low < 0 < e.high  # no effect: the interval covers 0
    with pytest.raises(ValueError, match="paired tables"):
        paired_effect([[1.0, 2.0]], [[1.0]])


def test_iterations_to_reach():
    curve = [0.1, 0.4, 0.69, 0.72, 0.8]
    assert iterations_to_reach(curve, 0.7, 25) == 100  # epoch index 3 -> 4 epochs x 25
    assert iterations_to_reach(curve, 0.9, 25) is None
    assert iterations_to_reach([math.nan, 0.8], 0.7, 10) == 20
