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


def test_weighted_aucs_equal_sklearn_with_sample_weights():
    from scripts.metrics.paired import weighted_aucs

    y, _, b = _synthetic(n=150, seed=6)  # b is rounded: ties
    rng = np.random.default_rng(0)
    weights = rng.multinomial(150, np.full(150, 1 / 150), size=20).astype(float)
    got = weighted_aucs(y, b, weights)
    expected = [roc_auc_score(y[w > 0], b[w > 0], sample_weight=w[w > 0]) for w in weights]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    repeated = np.repeat(np.arange(150), weights[0].astype(int))  # a weight is a slide drawn that many times
    assert got[0] == pytest.approx(roc_auc_score(y[repeated], b[repeated]), abs=1e-12)


def _clustered_cohort(rng, n_patients=40, slides=3, rho=0.9, effect_a=1.0):
    """Slides of a patient share the label and, per method, most of the score error (correlation rho)."""
    y = np.repeat((rng.random(n_patients) < 0.5).astype(int), slides)
    groups = np.repeat(np.arange(n_patients), slides)

    def error():
        return np.sqrt(rho) * np.repeat(rng.normal(size=n_patients), slides) + np.sqrt(1 - rho) * rng.normal(size=len(y))

    return y, effect_a * y + error(), y + error(), groups


def test_patient_bootstrap_keeps_its_level_where_slide_delong_does_not():
    """Null: both methods have the same expected AUC; 3 slides per patient with strongly correlated errors.
    DeLong counts 120 independent slides and rejects far too often; the patient bootstrap stays near 0.05."""
    rng = np.random.default_rng(11)
    n_sim, boot, delong = 200, 0, 0
    for i in range(n_sim):
        y, a, b, groups = _clustered_cohort(rng)
        boot += paired_bootstrap_auc(y, a, b, groups=groups, n_bootstrap=500, seed=i).p_value < 0.05
        delong += delong_test(y, a, b).p_value < 0.05
    assert boot / n_sim <= 0.09, boot / n_sim
    assert delong / n_sim >= 0.12 and delong > 2 * boot, (delong / n_sim, boot / n_sim)
    # still a test: a clearly better method is found
    power = sum(paired_bootstrap_auc(*_clustered_cohort(rng, effect_a=3.0)[:3], groups=np.repeat(np.arange(40), 3),
                                     n_bootstrap=500, seed=i).p_value < 0.05 for i in range(40))
    assert power >= 32, power


def test_patient_bootstrap_is_seeded():
    y, a, b, groups = _clustered_cohort(np.random.default_rng(3))
    first, again = (paired_bootstrap_auc(y, a, b, groups=groups, n_bootstrap=300, seed=5) for _ in range(2))
    other = paired_bootstrap_auc(y, a, b, groups=groups, n_bootstrap=300, seed=6)
    assert first == again and (first.ci_low, first.ci_high) != (other.ci_low, other.ci_high)
    assert first.n_groups == 40 and first.n_bootstrap == 300
