"""Paired AUC statistics: fast DeLong against a brute-force DeLong, its null behaviour, and the bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from scripts.metrics.paired import delong_auc_covariance, delong_test, midrank, paired_bootstrap_auc


def _synthetic(n=300, seed=0, noise_a=0.8, noise_b=1.2, prevalence=0.4):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    latent = rng.normal(size=n) + 1.0 * y
    a = latent + rng.normal(size=n) * noise_a
    b = np.round(latent + rng.normal(size=n) * noise_b, 1)  # rounded: exercises ties
    return y, a, b


def _delong_bruteforce(y, scores):
    """Textbook DeLong (1988) with the O(m n) Mann-Whitney kernel psi(x, y) = 1, 1/2, 0."""
    y = np.asarray(y).astype(bool)
    k = len(scores)
    v10, v01, aucs = [], [], []
    for s in scores:
        x_pos, x_neg = s[y], s[~y]
        psi = (x_pos[:, None] > x_neg[None, :]) + 0.5 * (x_pos[:, None] == x_neg[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(1))
        v01.append(psi.mean(0))
    v10, v01 = np.array(v10), np.array(v01)
    cov = np.cov(v10).reshape(k, k) / v10.shape[1] + np.cov(v01).reshape(k, k) / v01.shape[1]
    return np.array(aucs), cov


def test_midrank_matches_scipy():
    from scipy.stats import rankdata

    v = np.array([3.0, 1.0, 3.0, 2.0, 2.0, 2.0, 5.0])
    np.testing.assert_allclose(midrank(v), rankdata(v))


def test_fast_delong_equals_bruteforce_and_sklearn():
    y, a, b = _synthetic(n=250, seed=1)
    aucs, cov = delong_auc_covariance(y, np.vstack([a, b]))
    ref_aucs, ref_cov = _delong_bruteforce(y, [a, b])
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-14)
    assert aucs[0] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert aucs[1] == pytest.approx(roc_auc_score(y, b), abs=1e-12)


def test_identical_predictions_give_p_one():
    y, a, _ = _synthetic(n=200, seed=2)
    for method in (delong_test, paired_bootstrap_auc):
        res = method(y, a, a.copy())
        assert res.difference == 0.0
        assert res.p_value == 1.0
        assert res.ci_low == 0.0 and res.ci_high == 0.0


def test_delong_variance_agrees_with_paired_bootstrap():
    y, a, b = _synthetic(n=400, seed=3)
    d = delong_test(y, a, b)
    bs = paired_bootstrap_auc(y, a, b, n_bootstrap=2000, seed=0)
    assert d.difference == pytest.approx(bs.difference)
    assert 0.8 < (d.se / bs.se) ** 2 < 1.25, (d.se, bs.se)
    assert abs(d.p_value - bs.p_value) < 0.1
    assert d.ci_low < d.difference < d.ci_high


def test_delong_null_rejection_rate_and_power():
    """Two scorers with the same true AUC: about 5 % rejections at alpha 0.05; a clearly better one: most."""
    rng = np.random.default_rng(4)
    rejections, power = 0, 0
    n_sim = 400
    for _ in range(n_sim):
        n = 120
        y = (rng.random(n) < 0.5).astype(int)
        latent = rng.normal(size=n) + y
        a = latent + rng.normal(size=n)
        b = latent + rng.normal(size=n)
        rejections += delong_test(y, a, b).p_value < 0.05
        good = y * 3.0 + rng.normal(size=n)
        power += delong_test(y, good, b).p_value < 0.05
    assert 0.02 <= rejections / n_sim <= 0.09, rejections / n_sim
    assert power / n_sim > 0.9


def test_patient_bootstrap_wider_when_slides_of_a_patient_are_copies():
    y, a, b = _synthetic(n=80, seed=5)
    # every patient contributes 4 identical slides: slide resampling underestimates the spread
    y4, a4, b4 = np.repeat(y, 4), np.repeat(a, 4), np.repeat(b, 4)
    groups = np.repeat(np.arange(80), 4)
    slide = paired_bootstrap_auc(y4, a4, b4, n_bootstrap=800, seed=0)
    patient = paired_bootstrap_auc(y4, a4, b4, groups=groups, n_bootstrap=800, seed=0)
    assert patient.n_groups == 80 and patient.method == "paired_bootstrap_patient"
    assert patient.se > 1.5 * slide.se
    assert patient.ci_high - patient.ci_low > slide.ci_high - slide.ci_low


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="both positive and negative"):
        delong_test([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="one score per slide"):
        delong_test([0, 1, 1], [0.1, 0.2], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="NaN"):
        paired_bootstrap_auc([0, 1, 1], [0.1, np.nan, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="0/1"):
        delong_test([0, 2, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
