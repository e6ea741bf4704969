"""H2's bootstrap interval on small groups (4-10 runs) and with ties: it never vanishes.

The reference is the obvious one: scipy's own bootstrap where no resample is degenerate, and
where some are, the per-resample ``scipy.stats.spearmanr`` on the same index rows.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from deconcnn_cli.export import stats

TOL = 1e-12  # same resamples, same quantile rule: only summation order may differ
N_SMALL = 999  # resamples for the reference loops (scipy's spearmanr per resample is slow)


def _sample(n: int, seed: int, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    if ties:  # alpha rounded to few values (as a coarse fit gives), best_val_ce too
        x = np.round(x)
    y = -0.8 * x + rng.normal(size=n)
    if ties:
        y = np.round(y * 2) / 2
    return x, y


def _reference(x: np.ndarray, y: np.ndarray, n_resamples: int, seed: int) -> tuple:
    """Resample-until-defined by the slow obvious route: one spearmanr per index row."""
    rng = np.random.default_rng(seed)
    n = len(x)
    rhos: list[float] = []
    degenerate = 0
    while len(rhos) < n_resamples:
        for row in rng.integers(0, n, (n_resamples, n)):
            if len(rhos) == n_resamples:
                break
            if np.ptp(x[row]) == 0 or np.ptp(y[row]) == 0:
                degenerate += 1
                continue
            rhos.append(float(sps.spearmanr(x[row], y[row]).statistic))
    return np.array(rhos), degenerate


@pytest.mark.parametrize("n", range(4, 11))
@pytest.mark.parametrize("ties", [False, True])
def test_interval_exists_for_every_group_of_4_to_10_runs(n: int, ties: bool):
    for seed in range(3):
        x, y = _sample(n, seed, ties)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            continue  # rho itself undefined: "too few runs", not this test's case
        ci = stats.bootstrap_rho(x, y, n_resamples=N_SMALL, seed=seed)
        assert ci.method in ("BCa", "percentile")
        assert -1 <= ci.low <= ci.high <= 1 and ci.n_resamples == N_SMALL
        rho_b, degenerate = _reference(x, y, N_SMALL, seed)
        assert ci.n_degenerate == degenerate
        if ci.method == "percentile":
            ref = np.quantile(rho_b, [0.025, 0.975])
            assert (ci.low, ci.high) == pytest.approx(tuple(ref), abs=TOL)
        else:  # BCa's levels are monotone in the data: the interval lies in the resamples' range
            assert rho_b.min() - TOL <= ci.low and ci.high <= rho_b.max() + TOL


def test_without_degenerate_resamples_it_is_scipys_bca():
    for n in (8, 10, 16):
        x, y = _sample(n, n)
        ci = stats.bootstrap_rho(x, y)
        ref = sps.bootstrap((x, y), stats.spearman_rho, paired=True, vectorized=True,
                            n_resamples=stats.N_BOOTSTRAP, method="BCa",
                            rng=np.random.default_rng(stats.BOOTSTRAP_SEED))  # fmt: skip
        assert ci.n_degenerate == 0 and ci.method == "BCa"
        assert ci.low == pytest.approx(ref.confidence_interval.low, abs=TOL)
        assert ci.high == pytest.approx(ref.confidence_interval.high, abs=TOL)


def test_degenerate_draws_occur_as_often_as_theory_says():
    """With distinct values, a draw is degenerate exactly when it repeats one run: n / n^n."""
    for n, seeds in ((4, 20), (5, 20)):
        counts = []
        for seed in range(seeds):
            x, y = _sample(n, 100 + seed)
            counts.append(stats.bootstrap_rho(x, y, seed=seed).n_degenerate)
        p = n / n**n
        expected = stats.N_BOOTSTRAP * p / (1 - p)  # draws until 9,999 defined ones
        sd = math.sqrt(stats.N_BOOTSTRAP * p) / (1 - p) / math.sqrt(seeds)
        assert abs(np.mean(counts) - expected) < 4 * sd


def test_scipy_alone_loses_the_interval_that_we_keep():
    """scipy gives NaN for 5 runs (a resample repeats one run): the interval stays finite."""
    x, y = _sample(5, 0)
    with pytest.warns(sps.DegenerateDataWarning):
        ref = sps.bootstrap((x, y), stats.spearman_rho, paired=True, vectorized=True,
                            n_resamples=stats.N_BOOTSTRAP, method="percentile",
                            rng=np.random.default_rng(stats.BOOTSTRAP_SEED))  # fmt: skip
    assert math.isnan(ref.confidence_interval.low)
    ci = stats.bootstrap_rho(x, y)
    assert ci.n_degenerate > 0 and math.isfinite(ci.low) and math.isfinite(ci.high)


def test_ties_that_break_the_jackknife_fall_back_to_percentile():
    x = np.array([1.0, 1.0, 1.0, 2.0])  # leaving out run 4 makes alpha constant
    y = np.array([3.0, 1.0, 2.0, 0.5])
    ci = stats.bootstrap_rho(x, y)
    assert ci.method == "percentile" and ci.n_degenerate > 0.25 * stats.N_BOOTSTRAP
    assert math.isfinite(ci.low) and ci.low <= ci.high


@pytest.mark.parametrize("n", [4, 5, 6, 7])
def test_h2_row_of_a_small_variant_has_an_interval_and_its_count(n: int):
    x, y = _sample(n, 7)
    df = pd.DataFrame({
        "run_id": [f"r{i}" for i in range(n)], "variant": "base", "status": "completed",
        "alpha_early": x, "best_val_ce": y,
    })  # fmt: skip
    for row in stats.h2_rows(df):
        assert row.ci_method and math.isfinite(row.ci_low) and math.isfinite(row.ci_high)
        assert row.n_resamples == stats.N_BOOTSTRAP and row.n_degenerate >= 0
        assert row.verdict != stats.TOO_FEW


def test_h2_interval_depends_on_the_runs_not_on_the_order_of_the_rows():
    x, y = _sample(8, 3)
    ids = [f"run{i}" for i in (5, 2, 7, 0, 3, 6, 1, 4)]  # table order is not run-id order
    df = pd.DataFrame({"run_id": ids, "variant": "base", "status": "completed",
                       "alpha_early": x, "best_val_ce": y})  # fmt: skip
    rows = stats.h2_rows(df)
    for perm_seed in range(3):
        shuffled = df.sample(frac=1, random_state=perm_seed).reset_index(drop=True)
        assert stats.h2_rows(shuffled) == rows
    order = np.argsort(ids)  # the documented order: sorted by run id, seed BOOTSTRAP_SEED
    ci = stats.bootstrap_rho(x[order], y[order], seed=stats.BOOTSTRAP_SEED)
    overall = rows[0]
    assert (overall.ci_low, overall.ci_high) == (ci.low, ci.high)
    as_given = stats.bootstrap_rho(x, y, seed=stats.BOOTSTRAP_SEED)
    assert (as_given.low, as_given.high) != (ci.low, ci.high)  # the order did matter
