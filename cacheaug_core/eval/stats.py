"""Statistics of evaluation results, pure numpy (no model): perplexity from summed NLLs, percentile
bootstrap intervals (paired: every arm shares each resample of documents or items), Wilson
intervals of accuracies and the per-task metrics of `eval bench`.

    from cacheaug_core.eval.stats import ppl_summary, bootstrap_rel_change, wilson_interval
    W = resample_weights(n_documents)                  # (1000, D): one draw shared by every arm
    ci = bootstrap_rel_change(nll_aug, nll_dec, counts, weights=W)   # (A, 2) per position

Tested on synthetic data in tests/test_evaluate.py (`pytest tests/test_evaluate.py -k "bootstrap or wilson or summary"`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np


def ppl_summary(sum_aug: np.ndarray, sum_base: np.ndarray, count: np.ndarray) -> dict:
    """Perplexity by position from summed NLLs. Each argument (A,) or (U, A) summed over units.

    rel_ppl_change_pct = (ppl_aug / ppl_dec - 1) * 100: negative when the latents lower perplexity,
    the sign of the paper's Table 1.
    """
    sa, sb, n = (np.asarray(x, dtype=np.float64) for x in (sum_aug, sum_base, count))
    if sa.ndim == 2:
        sa, sb, n = sa.sum(0), sb.sum(0), n.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma, mb = sa / n, sb / n
        rel = (np.exp(ma - mb) - 1.0) * 100.0
    return {"nll_decoder": mb, "nll_augmented": ma, "ppl_decoder": np.exp(mb), "ppl_augmented": np.exp(ma),
            "rel_ppl_change_pct": rel, "tokens_scored": n.astype(np.int64)}


def resample_weights(units: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, units) counts of each unit in each bootstrap resample (a multinomial draw of `units`
    units with replacement). One draw shared by every arm and split makes every interval paired."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(units, np.full(units, 1.0 / units), size=n_boot).astype(np.float64)


def rel_change(sa, sb, n) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.exp((sa - sb) / n) - 1.0) * 100.0


def percentile_interval(x: np.ndarray, level: float = 0.95) -> np.ndarray:
    """Percentile interval over the first axis (resamples): (...,) -> (..., 2) [low, high]."""
    a = (1 - level) / 2 * 100
    with warnings.catch_warnings():   # a position with no scored token has no interval: NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.moveaxis(np.nanpercentile(x, [a, 100 - a], axis=0), 0, -1)


def bootstrap_rel_change(sum_aug: np.ndarray, sum_base: np.ndarray, count: np.ndarray, n_boot: int = 1000,
                         seed: int = 0, level: float = 0.95, weights: np.ndarray | None = None) -> np.ndarray:
    """Percentile bootstrap interval of rel_ppl_change_pct per position, resampling units.

    Each argument is (U, A): per unit (document) summed NLL of each arm and the number of tokens
    scored. A resample draws U units with replacement; both arms use the same draw (paired), and
    `weights` (n_boot, U) from `resample_weights` shares one draw across calls. Returns (A, 2).
    """
    U = sum_aug.shape[0]
    if U < 2:
        point = ppl_summary(sum_aug, sum_base, count)["rel_ppl_change_pct"]
        return np.stack([point, point], 1)
    W = resample_weights(U, n_boot, seed) if weights is None else weights               # (n_boot, U)
    return percentile_interval(rel_change(W @ sum_aug, W @ sum_base, W @ count), level)        # (A, 2)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (fractions)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap_delta(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a - b) over items resampled with replacement (paired).

    Resampling n items is a multinomial draw over the distinct values of a - b ({-1, 0, 1} for
    correctness), so no (n_boot, n) index matrix is built.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = d.size
    if n == 0:
        return (float("nan"), float("nan"))
    vals, cnt = np.unique(d, return_counts=True)
    draws = np.random.default_rng(seed).multinomial(n, cnt / n, size=n_boot)       # (n_boot, n_values)
    means = draws @ vals / n
    a_ = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [a_, 100 - a_])
    return (float(lo), float(hi))


def _rate(correct: list[bool], base: list[bool] | None = None) -> dict:
    k, n = int(sum(correct)), len(correct)
    r = {"value": k / n if n else float("nan"), "ci95": list(wilson_interval(k, n)), "correct": k, "n": n}
    if base is not None:
        r["delta_vs_decoder"] = r["value"] - sum(base) / n if n else float("nan")
        r["delta_ci95"] = list(paired_bootstrap_delta(correct, base))
    return r


def task_metrics(arms, correct: dict) -> dict:
    """Metrics of one task from per-item correctness: correct[arm][metric] = list of bools, in item
    order. An arm without an entry (CoT on log-likelihood tasks) gets None. Each metric is a `_rate`
    (Wilson interval); arms other than decoder add the paired-bootstrap delta against it. A sharded
    run's merge (`merge_bench`) calls this on the concatenated lists, so it equals a single run."""
    base = correct.get("decoder")
    metrics = {}
    for a in arms:
        if correct.get(a) is None:
            metrics[a] = None
            continue
        paired = a != "decoder" and base is not None
        metrics[a] = {k: _rate(v, base[k] if paired else None) for k, v in correct[a].items()}
    return metrics
