"""H1 and H2 on an exported results table (docs/report.md). Pure: a DataFrame in, rows out.

- H1: the share of completed runs with ``r_squared >= 0.98``, an exact (Clopper-Pearson) 95%
  interval, against a target of 90%.
- H2: Spearman rho(``alpha_early``, ``best_val_ce``) over runs, its p-value and a 95%
  bootstrap interval (runs resampled in pairs; BCa, percentile where BCa cannot be formed),
  against a target of |rho| >= 0.7. Resamples on which rho is undefined (one run repeated,
  or only tied runs drawn) are redrawn and counted, so the interval exists whenever rho does.
  The runs are put in run-id order before resampling, and each row's bootstrap starts a fresh
  generator from ``BOOTSTRAP_SEED``: the interval depends on the set of runs, never on the
  order of the table's rows.

A verdict reads the interval, not only the point estimate: ``supported`` when the whole 95%
interval meets the target, ``not supported`` when the whole interval misses it,
``inconclusive`` when it straddles the target, ``too few runs`` below the minimum.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from deconcnn_cli.export.columns import require_columns

R2_THRESHOLD = 0.98  # H1: a run "follows a power law" when its fit's R^2 reaches this
H1_TARGET = 0.90  # H1 holds when more than this share of runs do
H2_TARGET = 0.70  # H2 holds when |rho| reaches this
CONFIDENCE = 0.95
N_BOOTSTRAP = 9999  # bootstrap resamples
BOOTSTRAP_SEED = 0  # seeds numpy's default_rng afresh for each H2 row: same runs, same interval
MIN_RUNS_H2 = 4  # Spearman's rho on fewer runs says nothing

H1_COLUMNS = ("run_id", "variant", "status", "r_squared")
H2_COLUMNS = ("run_id", "variant", "status", "alpha_early", "best_val_ce")

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, TOO_FEW = (
    "supported",
    "not supported",
    "inconclusive",
    "too few runs",
)


@dataclass(frozen=True)
class H1Row:
    group: str  # "all" or a variant
    time_axis: str  # "step" | "lr"
    n_runs: int  # completed runs with a finite R^2
    n_power_law: int  # of which R^2 >= R2_THRESHOLD
    share: float
    ci_low: float
    ci_high: float
    n_diverged: int  # counted apart, never in n_runs
    n_excluded: int  # neither: failed, missing, running, or no R^2
    verdict: str
    analysis_settings: str = ""  # the settings id, where the table's runs used several


@dataclass(frozen=True)
class H2Row:
    group: str
    time_axis: str
    n_runs: int
    rho: float
    p_value: float
    ci_low: float
    ci_high: float
    ci_method: str  # "BCa" | "percentile" | ""
    n_resamples: int  # defined bootstrap resamples behind the interval
    n_degenerate: int  # draws with rho undefined, redrawn (BootstrapCI)
    n_diverged: int
    n_excluded: int
    verdict: str
    analysis_settings: str = ""  # the settings id, where the table's runs used several


def as_dict(row: H1Row | H2Row) -> dict[str, Any]:
    return asdict(row)


def _groups(df: Any) -> list[tuple[str, str, Any]]:
    """``(group, settings id, rows)``: overall and per variant, within each set of analysis
    settings when the table's runs used more than one (never pooled); settings "" otherwise."""
    ids: list[str] = []
    if "analysis_settings" in df.columns:
        ids = sorted({str(v) for v in df["analysis_settings"].dropna()})
    if len(ids) <= 1:
        return [("all", "", df)] + [(str(v), "", g) for v, g in df.groupby("variant", sort=True)]
    out = []
    for sid in ids:
        sub = df[df["analysis_settings"] == sid]
        out += [("all", sid, sub)] + [(str(v), sid, g) for v, g in sub.groupby("variant")]
    return out


def finished(df: Any) -> Any:
    """Boolean mask of the runs whose results are final: completed, and passing verification
    (``verify_problem`` empty, where the column is there). A failed or stalled run's last
    values are mid-training; a run failing ``decon verify`` may rest on missing or foreign
    data (a gap in a stream, a checksum, a foreign config)."""
    done = df["status"] == "completed"
    if "verify_problem" in df.columns:
        done &= df["verify_problem"].fillna("").astype(str).str.len() == 0
    return done


def _eligible(df: Any, columns: tuple[str, ...]) -> tuple[Any, int, int]:
    """(completed runs with finite values in ``columns`` that pass verification, n diverged,
    n excluded otherwise): :func:`finished` runs only."""
    completed = finished(df)
    finite = np.ones(len(df), dtype=bool)
    for col in columns:
        finite &= np.isfinite(df[col].to_numpy(dtype=float, na_value=np.nan))
    keep = completed.to_numpy() & finite
    n_div = int((df["status"] == "diverged").sum())
    return df[keep], n_div, len(df) - int(keep.sum()) - n_div


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact binomial interval for ``k`` successes in ``n`` trials."""
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def h1_rows(df: Any, r2_column: str = "r_squared", time_axis: str = "step") -> list[H1Row]:
    """H1 overall and per variant on the table's ``r2_column``."""
    require_columns(df.columns, (*H1_COLUMNS, r2_column), "the results table")
    out = []
    for group, sid, g in _groups(df):
        runs, n_div, n_exc = _eligible(g, (r2_column,))
        n = len(runs)
        k = int((runs[r2_column].to_numpy(dtype=float) >= R2_THRESHOLD).sum())
        if n == 0:
            nan = math.nan
            out.append(H1Row(group, time_axis, 0, 0, nan, nan, nan, n_div, n_exc, TOO_FEW, sid))
            continue
        low, high = clopper_pearson(k, n)
        # "more than 90%": supported when the whole interval lies above the target
        if low > H1_TARGET:
            verdict = SUPPORTED
        elif high <= H1_TARGET:
            verdict = NOT_SUPPORTED
        else:
            verdict = INCONCLUSIVE
        out.append(H1Row(group, time_axis, n, k, k / n, low, high, n_div, n_exc, verdict, sid))
    return out


def spearman_rho(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho along ``axis`` (vectorised: Pearson correlation of average ranks)."""
    rx = stats.rankdata(x, axis=axis)
    ry = stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(axis=axis) / np.sqrt((rx**2).sum(axis=axis) * (ry**2).sum(axis=axis))


@dataclass(frozen=True)
class BootstrapCI:
    """A bootstrap interval of rho and how it was formed.

    ``n_resamples`` defined resamples make the interval; ``n_degenerate`` more were drawn and
    redrawn because rho is undefined on them (every resampled run has the same alpha, or the
    same best_val_ce: a resample that repeats one run, or draws only tied runs). ``method`` is
    "BCa", or "percentile" where BCa's acceleration cannot be formed (a leave-one-out sample
    with a constant column, possible with ties), or "" when no resample is defined at all.
    """

    low: float
    high: float
    method: str
    n_resamples: int
    n_degenerate: int


def _resample_rhos(
    x: np.ndarray, y: np.ndarray, n_resamples: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """``n_resamples`` defined bootstrap values of rho (pairs resampled) and how many
    degenerate draws were redrawn to get them.

    Resample until defined: batches of ``n_resamples`` index rows are drawn (the first batch is
    exactly ``scipy.stats.bootstrap``'s, same generator, same order), degenerate rows are
    dropped and counted, and drawing goes on until enough are defined. Conditioning on a
    defined rho is what the interval can describe; it leaves a sample without degenerate draws
    untouched. Bounded: at most ``_MAX_ROUNDS`` batches.
    """
    n = len(x)
    kept: list[np.ndarray] = []
    n_kept = n_degenerate = 0
    for _ in range(_MAX_ROUNDS):
        idx = rng.integers(0, n, (n_resamples, n))
        rho = spearman_rho(x[idx], y[idx])
        ok = np.isfinite(rho)
        need = n_resamples - n_kept
        if ok.sum() >= need:  # the draws up to the last one needed, in order
            last = int(np.searchsorted(np.cumsum(ok), need)) + 1
            rho, ok = rho[:last], ok[:last]
        n_degenerate += int((~ok).sum())
        kept.append(rho[ok])
        n_kept += int(ok.sum())
        if n_kept >= n_resamples:
            break
    return np.concatenate(kept), n_degenerate


_MAX_ROUNDS = 50  # a defined resample is >= ~30% likely whenever rho itself is defined


def _bca_levels(x: np.ndarray, y: np.ndarray, rho_b: np.ndarray, alpha: float) -> tuple:
    """BCa's quantile levels (Efron & Tibshirani 1993, 14.3), as scipy forms them; NaN where
    the acceleration or the bias correction is not defined."""
    from scipy.special import ndtr, ndtri

    theta = float(spearman_rho(x, y))
    z0 = ndtri(((rho_b < theta).sum() + (rho_b <= theta).sum()) / (2 * len(rho_b)))
    n = len(x)
    others = np.array([np.delete(np.arange(n), i) for i in range(n)])  # the jackknife
    jack = spearman_rho(x[others], y[others])
    d = jack.mean() - jack
    with np.errstate(invalid="ignore", divide="ignore"):
        a_hat = (d**3).sum() / (6 * ((d**2).sum()) ** 1.5)
    z = ndtri(alpha)
    low = ndtr(z0 + (z0 + z) / (1 - a_hat * (z0 + z)))
    high = ndtr(z0 + (z0 - z) / (1 - a_hat * (z0 - z)))
    return float(low), float(high)


def bootstrap_rho(
    x: np.ndarray, y: np.ndarray, n_resamples: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED
) -> BootstrapCI:
    """95% bootstrap interval of rho over runs (pairs resampled): BCa, else percentile.

    ``np.random.default_rng(seed)`` draws index rows into ``x`` and ``y`` as given, so the
    interval depends on their order: callers fix one (:func:`h2_rows` sorts by run id).

    Degenerate resamples (rho undefined) are redrawn and counted (:func:`_resample_rhos`),
    so the interval exists whenever rho of the sample itself does. Without degenerate draws it
    equals ``scipy.stats.bootstrap(..., paired=True, method="BCa")`` with the same generator.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    rho_b, n_degenerate = _resample_rhos(x, y, n_resamples, rng)
    if not rho_b.size:
        return BootstrapCI(math.nan, math.nan, "", 0, n_degenerate)
    alpha = (1 - CONFIDENCE) / 2
    levels, method = _bca_levels(x, y, rho_b, alpha), "BCa"
    if not all(math.isfinite(v) for v in levels):
        levels, method = (alpha, 1 - alpha), "percentile"
    low, high = np.quantile(rho_b, levels)
    return BootstrapCI(float(low), float(high), method, len(rho_b), n_degenerate)


def h2_rows(
    df: Any, alpha_column: str = "alpha_early", time_axis: str = "step", seed: int = BOOTSTRAP_SEED
) -> list[H2Row]:
    """H2 overall and per variant: rho(``alpha_column``, ``best_val_ce``).

    Each row's runs are sorted by ``run_id`` before :func:`bootstrap_rho` resamples them
    with ``seed`` (``BOOTSTRAP_SEED`` in the report): resample ``b`` draws the same runs
    whatever the order of the table's rows (the export's order, the grid's, a shuffled CSV)."""
    require_columns(df.columns, (*H2_COLUMNS, alpha_column), "the results table")
    out = []
    for group, sid, g in _groups(df):
        runs, n_div, n_exc = _eligible(g, (alpha_column, "best_val_ce"))
        runs = runs.sort_values("run_id", kind="stable")  # resampling order: by run id
        n = len(runs)
        x = runs[alpha_column].to_numpy(dtype=float)
        y = runs["best_val_ce"].to_numpy(dtype=float)
        if n < MIN_RUNS_H2 or np.ptp(x) == 0 or np.ptp(y) == 0:
            nan = math.nan
            row = H2Row(
                group, time_axis, n, nan, nan, nan, nan, "", 0, 0, n_div, n_exc, TOO_FEW, sid
            )
            out.append(row)
            continue
        res = stats.spearmanr(x, y)
        ci = bootstrap_rho(x, y, seed=seed)
        low, high = ci.low, ci.high
        if not ci.method:
            verdict = INCONCLUSIVE
        elif low >= H2_TARGET or high <= -H2_TARGET:
            verdict = SUPPORTED
        elif low > -H2_TARGET and high < H2_TARGET:
            verdict = NOT_SUPPORTED
        else:
            verdict = INCONCLUSIVE
        out.append(
            H2Row(
                group,
                time_axis,
                n,
                float(res.statistic),
                float(res.pvalue),
                low,
                high,
                ci.method,
                ci.n_resamples,
                ci.n_degenerate,
                n_div,
                n_exc,
                verdict,
                sid,
            )
        )
    return out


def has_values(df: Any, column: str) -> bool:
    """Whether ``column`` exists and holds at least one finite value (lr-time fits)."""
    if column not in df.columns:
        return False
    return bool(np.isfinite(df[column].to_numpy(dtype=float, na_value=np.nan)).any())
