"""Patient-level (cluster) bootstrap of the AUC, stratified by label (scripts/metrics/classification.py)."""

import math

import numpy as np
import pytest

from scripts.metrics import bootstrap_auc_ci, ci_method, classification_report, format_ci


def _cohort(n_patients=24, slides=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(n_patients)])
    probs = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.25, n_patients), 0, 1)
    return labels, probs, np.repeat(labels, slides), np.repeat(probs, slides), np.repeat(np.arange(n_patients), slides)


def test_patient_bootstrap_equals_the_one_slide_per_patient_interval_and_is_wider_than_slides():
    labels, probs, slide_labels, slide_probs, patients = _cohort()
    per_patient = bootstrap_auc_ci(labels, probs, n_boot=1000, seed=3)
    clustered = bootstrap_auc_ci(slide_labels, slide_probs, n_boot=1000, seed=3, groups=[f"P{p:02d}" for p in patients])
    naive = bootstrap_auc_ci(slide_labels, slide_probs, n_boot=1000, seed=3)
    # 4 identical slides per patient carry no more information than one: same resamples, same AUCs
    np.testing.assert_allclose(clustered, per_patient, atol=1e-12)
    assert clustered[1] - clustered[0] > 1.5 * (naive[1] - naive[0])


def test_stratified_resamples_keep_both_classes_even_with_one_positive_patient():
    labels = np.array([1, 1] + [0] * 18)
    probs = np.linspace(0.9, 0.0, 20)
    patients = ["A", "A"] + [f"N{i}" for i in range(18)]
    low, high = bootstrap_auc_ci(labels, probs, n_boot=300, groups=patients)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)  # every resample holds patient A, ranked first


def test_unstratified_one_class_resamples_are_redrawn_whole():
    # 1 positive of 6: about a third of unstratified resamples miss it; they are redrawn, so every kept AUC
    # is from a genuine resample. The positive ranks below 2 of 5 negatives: a kept AUC is a multiple of
    # 1/(n_pos*n_neg) of some real resample, never the patched value of the old one-index swap.
    labels = np.array([1, 0, 0, 0, 0, 0])
    probs = np.array([0.5, 0.9, 0.8, 0.1, 0.2, 0.3])
    low, high = bootstrap_auc_ci(labels, probs, n_boot=500, seed=1, stratified=False)
    assert 0.0 <= low <= 0.6 <= high <= 1.0
    assert not math.isnan(low)


def test_method_is_named_next_to_the_interval():
    labels, probs, slide_labels, slide_probs, patients = _cohort(n_patients=10, slides=2)
    report = classification_report(slide_labels, slide_probs, 0.5, n_boot=200, groups=patients)
    assert report["ci_method"] == "patient bootstrap (stratified, 200), percentile 95%"
    assert classification_report(labels, probs, 0.5, n_boot=200)["ci_method"].startswith("slide bootstrap (stratified, 200)")
    assert ci_method(2000, groups=patients).startswith("patient bootstrap (stratified, 2000)")


def test_three_decimals_and_undefined():
    assert format_ci(0.81234, [0.7, 0.912345]) == "0.812 [0.700, 0.912]"
    assert format_ci(float("nan"), [None, None]) == "n/a [n/a, n/a]"
    assert bootstrap_auc_ci([1, 1, 1], [0.2, 0.3, 0.4], groups=["a", "b", "c"]) == pytest.approx([math.nan, math.nan], nan_ok=True)
    with pytest.raises(ValueError, match="patient ids"):
        bootstrap_auc_ci([0, 1], [0.2, 0.3], groups=["a"])
