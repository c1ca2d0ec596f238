"""Paired comparison of two classifiers' ROC AUCs on the same slides.

* :func:`paired_bootstrap_auc` — paired bootstrap of the AUC difference. With ``groups`` (patient ids)
  patients are resampled with replacement, each with all its slides, and both methods' scores of a
  drawn slide stay together: the comparison's headline test (``scripts.experiments.compare``), because slides of one
  patient are correlated and must not count as independent evidence. The AUC itself stays per slide
  (every slide is one unit of the ranking); the patients are the resampling clusters only. Two-sided p
  from the bootstrap distribution of the difference; seeded; 2000 resamples by default; vectorised
  over the resamples (:func:`weighted_aucs`). Without ``groups`` every slide is its own cluster.
* :func:`delong_test` — DeLong, DeLong & Clarke-Pearson (1988) test for two correlated AUCs, computed with
  the fast O(n log n) algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21:1389): the
  structural components come from mid-ranks instead of the O(m n) pairwise kernel. It **assumes
  independent slides**: with several correlated slides per patient its p-values are too small (on the
  synthetic null of tests/test_paired_stats.py, 40 patients with 3 strongly correlated slides each, it
  rejects 21.5 % of 200 cohorts at alpha 0.05, the patient bootstrap 3.5 %). Valid for one slide per
  patient.

Both return a :class:`PairedComparison` with the difference ``auc_a - auc_b``, a 95 % confidence
interval and a two-sided p-value. CLI: ``python -m scripts.metrics.paired <csv> --label label
--score_a a --score_b b [--group patient_id]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats


@dataclass
class PairedComparison:
    method: str
    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    ci_low: float
    ci_high: float
    p_value: float
    se: float  # standard error of the difference
    n_slides: int
    n_positive: int
    n_bootstrap: int = 0  # resamples used (bootstrap only)
    n_groups: int = 0  # patients resampled (bootstrap with groups only)

    def as_dict(self) -> dict:
        return asdict(self)


def _check_inputs(labels, *score_sets):
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-d; got shape {y.shape}")
    uniq = np.unique(y)
    if not np.isin(uniq, [0, 1]).all():
        raise ValueError(f"labels must be 0/1; got values {uniq[:10].tolist()}")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("an AUC needs both positive and negative slides; the labels hold only one class")
    out = []
    for name, s in zip("ab", score_sets):
        s = np.asarray(s, dtype=np.float64)
        if s.shape != y.shape:
            raise ValueError(f"scores {name} have shape {s.shape} but labels have {y.shape}; give one score per slide")
        if not np.isfinite(s).all():
            raise ValueError(f"scores {name} contain NaN or infinite values ({int((~np.isfinite(s)).sum())} slides)")
        out.append(s)
    return y, out


def midrank(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (mid-ranks), O(n log n)."""
    order = np.argsort(values, kind="mergesort")
    sorted_v = values[order]
    n = len(values)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], n]
    mid = 0.5 * (starts + ends - 1) + 1.0  # average of 1-based positions start+1 .. end
    ranks_sorted = np.repeat(mid, ends - starts)
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks_sorted
    return out


def delong_auc_covariance(labels, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and their DeLong covariance (k, k) for k score sets ``scores`` (k, n) on the same slides."""
    y = np.asarray(labels).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    k = scores.shape[0]
    v10, v01, aucs = np.empty((k, m)), np.empty((k, n)), np.empty(k)
    for r in range(k):
        tx, ty = midrank(pos[r]), midrank(neg[r])
        tz = midrank(np.concatenate([pos[r], neg[r]]))
        aucs[r] = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
        v10[r] = (tz[:m] - tx) / n  # fraction of negatives below each positive (ties count 1/2)
        v01[r] = 1.0 - (tz[m:] - ty) / m  # fraction of positives above each negative
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((k, k))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((k, k))
    return aucs, s10 / m + s01 / n


def delong_test(labels, score_a, score_b, alpha: float = 0.05) -> PairedComparison:
    """DeLong's test of AUC(a) == AUC(b) on the same slides (two-sided), with a Wald CI of the difference."""
    y, (a, b) = _check_inputs(labels, score_a, score_b)
    aucs, cov = delong_auc_covariance(y, np.vstack([a, b]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    var = max(var, 0.0)
    se = math.sqrt(var)
    z = float(stats.norm.ppf(1 - alpha / 2))
    if se <= 1e-15:
        p = 1.0 if abs(diff) <= 1e-15 else 0.0
    else:
        p = float(2 * stats.norm.sf(abs(diff) / se))
    return PairedComparison("delong", float(aucs[0]), float(aucs[1]), diff, float(diff - z * se), float(diff + z * se), p, se,
                            int(len(y)), int(y.sum()))


def auc(labels, scores) -> float:
    """Mann-Whitney ROC AUC (ties count 1/2)."""
    y, (s,) = _check_inputs(labels, scores)
    return float(delong_auc_covariance(y, s[None])[0][0])


def _fast_auc(y: np.ndarray, s: np.ndarray) -> float:
    m = int(y.sum())
    n = len(y) - m
    r = midrank(s)
    return (r[y].sum() - m * (m + 1) / 2.0) / (m * n)


BOOTSTRAP_CHUNK = 256  # resamples computed together (bounds memory: a few (chunk, n_slides) arrays)


def weighted_aucs(labels, scores, weights) -> np.ndarray:
    """Mann-Whitney AUC of ``scores`` (n,) under each row of ``weights`` (B, n): slide multiplicities of
    B bootstrap resamples (a slide drawn k times counts k times; ties count 1/2). Vectorised over the
    resamples: (B,) AUCs, NaN for a row without positive or without negative weight."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    uniq, inverse = np.unique(s, return_inverse=True)
    w_neg, w_pos = w[:, ~y], w[:, y]
    neg_values = inverse[~y]
    order = np.argsort(neg_values, kind="stable")
    sorted_values = neg_values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    per_value = np.zeros((w.shape[0], len(uniq)))  # negative weight at each distinct score
    per_value[:, sorted_values[starts]] = np.add.reduceat(w_neg[:, order], starts, axis=1)
    below = np.cumsum(per_value, axis=1) - per_value  # negative weight strictly below each distinct score
    pos_values = inverse[y]
    wins = below[:, pos_values] + 0.5 * per_value[:, pos_values]  # (B, n_pos)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w_pos * wins).sum(1) / (w_pos.sum(1) * w_neg.sum(1))


def paired_bootstrap_auc(labels, score_a, score_b, groups=None, n_bootstrap: int = 2000, seed: int = 0,
                         alpha: float = 0.05) -> PairedComparison:
    """Paired bootstrap of AUC(a) - AUC(b), the comparison's headline test when ``groups`` are patients.

    Each resample draws the clusters (``groups``: patients, each carrying all its slides; without
    ``groups`` every slide is its own cluster) with replacement, and both methods' scores of a drawn
    slide go into that resample together (paired). The AUC stays a per-slide AUC (every slide is one
    unit of the ranking); only the resampling is by patient, so slides of one patient, whose scores are
    correlated, are never treated as independent. Resamples without both classes are redrawn. CI:
    percentile interval. p-value (two-sided) from the bootstrap distribution of the difference:
    ``2 * min(P*(d <= 0), P*(d >= 0))`` with a +1 correction, capped at 1. Seeded (``seed``): the same
    inputs give the same p. Vectorised (:func:`weighted_aucs`): 2000 resamples of a few hundred slides
    take well under a second.
    """
    y, (a, b) = _check_inputs(labels, score_a, score_b)
    rng = np.random.default_rng(seed)
    n = len(y)
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != y.shape:
            raise ValueError(f"groups have shape {g.shape} but labels have {y.shape}; give one patient id per slide")
        _, inverse = np.unique(g, return_inverse=True)
        n_groups = int(inverse.max()) + 1
        if n_groups < 2:
            raise ValueError("a patient-level bootstrap needs at least 2 patients")
    else:
        inverse, n_groups = np.arange(n), n
    chunks, kept, drawn = [], 0, 0
    uniform = np.full(n_groups, 1.0 / n_groups)
    while kept < n_bootstrap:
        if drawn > 20 * n_bootstrap:
            raise ValueError("could not draw resamples holding both classes; too few positive or negative slides")
        size = min(BOOTSTRAP_CHUNK, max(n_bootstrap - kept, 16))
        drawn += size
        weights = rng.multinomial(n_groups, uniform, size=size)[:, inverse].astype(np.float64)
        both = (weights[:, y].sum(1) > 0) & (weights[:, ~y].sum(1) > 0)
        weights = weights[both]
        if len(weights):
            chunks.append(weighted_aucs(y, a, weights) - weighted_aucs(y, b, weights))
            kept += len(weights)
    d = np.concatenate(chunks)[:n_bootstrap]
    auc_a, auc_b = _fast_auc(y, a), _fast_auc(y, b)
    diff = auc_a - auc_b
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min((np.sum(d <= 0) + 1) / (len(d) + 1), (np.sum(d >= 0) + 1) / (len(d) + 1)))
    if np.all(d == 0) and diff == 0:
        p = 1.0
    return PairedComparison("paired_bootstrap" + ("_patient" if groups is not None else "_slide"),
                            float(auc_a), float(auc_b), float(diff), float(lo), float(hi), float(p),
                            float(d.std(ddof=1)), int(n), int(y.sum()), int(len(d)), int(n_groups if groups is not None else 0))


def compare_csv(csv: str, label: str = "label", score_a: str = "score_a", score_b: str = "score_b",
                group: str | None = None, n_bootstrap: int = 2000, seed: int = 0) -> str:
    """Both tests on a CSV with one row per slide; prints and returns JSON. With ``group`` (the patient
    column) ``bootstrap`` is the patient-cluster bootstrap, the test to read; ``delong`` assumes
    independent slides."""
    df = pd.read_csv(csv)
    missing = [c for c in (label, score_a, score_b, group) if c and c not in df.columns]
    if missing:
        raise ValueError(f"{csv}: missing column(s) {missing}; columns present: {list(df.columns)}")
    res = {"delong": delong_test(df[label], df[score_a], df[score_b]).as_dict(),
           "bootstrap": paired_bootstrap_auc(df[label], df[score_a], df[score_b],
                                             groups=df[group] if group else None,
                                             n_bootstrap=n_bootstrap, seed=seed).as_dict()}
    text = json.dumps(res, indent=2)
    print(text)
    return text


if __name__ == "__main__":
    import fire

    fire.Fire(compare_csv)
