"""Side-by-side comparison of MIL methods on the same patient-level cross-validation splits.

Run with the bundle config (see docs/compare.md)::

    python -m monai.bundle run --config_file "['configs/train.json','configs/compare.json']" \\
        --datalist <csv> --output_dir <out> [--methods "['smile','abmil_gated','clam_sb']"] [--epochs N]
    python -m monai.bundle run --config_file "['configs/train.json','configs/compare.json']" --data musk1.npz --output_dir <out>

``configs/compare.json`` is an overlay on ``configs/train.json``: the training recipe (optimiser, epochs,
batch size, early stopping, seed, device), the paths and the splits come from ``train.json``;
``compare.json`` adds the methods, the tests and the ablation/transfer grids.

Every chosen method is cross-validated on the same folds (``<out>/splits.json``, made once and reused)
by :func:`scripts.workflows.training.config_cross_validation`: each fold is trained by ``train.json``'s
``train`` / ``validate`` sections with all their handlers (:func:`scripts.workflows.training.train_from_config`,
the trainer of ``run training``), the method chosen by config overrides (``network_def#name``,
``network_def#network_kwargs``, ...; :func:`scripts.networks.methods.method_config_overrides`). Outputs under
``<out>/compare/``:

* ``<method>/cv/``: that method's fold models (``fold<k>/`` also holds what the config's handlers write:
  TensorBoard events, ``checkpoints/``), ``oof_predictions.csv``, ``summary.json``, ``roc.png``;
* ``oof_predictions.csv``: one row per slide, one ``prob_<method>`` column per method;
* ``comparison.csv`` / ``comparison.json`` / ``comparison.md``: per method the fold AUC mean and standard
  deviation, the pooled out-of-fold AUC with its 95 % bootstrap interval, accuracy, balanced accuracy,
  F1, sensitivity and specificity (each fold's threshold chosen on its validation split), and for the
  reference method (SMILE) against each other method the AUC difference with its headline paired test,
  a patient-cluster paired bootstrap (``p_patient_bootstrap``, Holm-adjusted across methods in
  ``p_patient_bootstrap_holm``, with its 95 % interval; :data:`PAIRED_TEST`), and for reference a
  slide-level DeLong p that assumes independent slides (``p_delong_independent_slides``);
* ``roc.png``: pooled out-of-fold ROC curves of all methods;
* with ``annotations`` (slide_id -> QuPath GeoJSON, the datalist's ``annotations`` column): per method
  ``<method>/localisation_summary.json``, ``<method>/localisation_slides.csv`` and
  ``<method>/localisation/<slide_id>.csv``, scoring each slide's out-of-fold attention (the fold model
  that never saw its patient) against its annotations, and localisation columns in the table
  (:mod:`scripts.metrics.localisation`; methods without attention get none).

One method failing (e.g. out of memory) is reported in the table and does not stop the others.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from scripts.data.bags import Bag, BagList, bags_from_datalist, bags_from_npz, feature_shape
from scripts.experiments.pooled_baseline import DESCRIPTION as FLOOR_DESCRIPTION
from scripts.experiments.pooled_baseline import FLOOR_NAME, pooled_cross_validation
from scripts.formats.layout import OutputLayout
from scripts.metrics import nan_to_none, plot_roc
from scripts.metrics.localisation import SlideAttention, bag_attention, localise_cohort, patch_geometry
from scripts.metrics.paired import delong_test, paired_bootstrap_auc
from scripts.networks.methods import DEFAULT_METHODS, count_parameters, method_config_overrides, resolve_methods
from scripts.utils.io_utils import atomic_path, write_csv, write_json
from scripts.workflows.training import (
    config_cross_validation,
    config_parser_for,
    training_description,
)

logger = logging.getLogger(__name__)

CACHE_LIMIT_BYTES = 2 * 1024**3
PAIRED_TEST = (
    "patient-cluster paired bootstrap of the pooled out-of-fold AUC difference (per-slide AUC; patients resampled "
    "with replacement with all their slides, both methods' scores together; two-sided p from the bootstrap "
    "distribution; Holm-adjusted across the compared methods)"
)
DELONG_NOTE = "slide-level DeLong: assumes independent slides (too small p when a patient has several slides)"


# ----------------------------------------------------------------------------------------------- data


def load_bags(
    datalist: str | Path | None = None,
    features_dir: str | Path | None = None,
    data: str | Path | None = None,
    cache_features: Any = "auto",
    cache_limit_bytes: int = CACHE_LIMIT_BYTES,
) -> list[Bag]:
    """The cohort's bags: a classic MIL ``.npz`` when ``data`` is given, else the datalist's feature files.

    ``cache_features``: ``True`` reads every feature file into memory once (several methods and grid
    cells re-read each bag every epoch), ``False`` never, ``"auto"`` when the features take less than
    ``cache_limit_bytes`` (2 GiB).
    """
    if data not in (None, ""):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"--data {path}: no such file; give a classic MIL .npz (arrays X, bag, bag_y)")
        return bags_from_npz(path)
    if datalist in (None, ""):
        raise ValueError("give --datalist <csv> (with features under <output_dir>/features) or --data <file.npz>")
    bags = bags_from_datalist(datalist, features_dir)
    if isinstance(cache_features, str):
        if cache_features.lower() not in ("auto", "true", "false"):
            raise ValueError(f"cache_features must be true, false or 'auto'; got {cache_features!r}")
        cache_features = "auto" if cache_features.lower() == "auto" else cache_features.lower() == "true"
    if cache_features == "auto":
        total = sum(int(np.prod(feature_shape(b.features_path))) * 4 for b in bags)
        cache_features = total <= cache_limit_bytes
        if not cache_features:
            logger.info("features take %.1f GiB: read from disk every epoch (cache_features=true forces memory)", total / 1024**3)
    if not cache_features:
        return bags

    cached = BagList(
        dataclasses.replace(b, features=b.load())  # file paths kept: fold checkpoints fingerprint them
        for b in tqdm(bags, desc="reading features", unit="slide", leave=False)
    )
    cached.skipped = list(getattr(bags, "skipped", []))
    cached.feature_record = dict(getattr(bags, "feature_record", None) or {})
    return cached


# ----------------------------------------------------------------------------------------------- settings


def as_bool(value: Any, name: str) -> bool:
    """A flag given in a config or on the command line (``true``/``false`` arrive as strings)."""
    if isinstance(value, str):
        if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name} must be true or false; got {value!r}")
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


# ----------------------------------------------------------------------------------------------- comparison


def compare_methods(
    bags: Sequence[Bag],
    splits: dict,
    output_dir: str | Path,
    methods: Sequence[str] | str = DEFAULT_METHODS,
    reference: str = "smile",
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    n_bootstrap: int = 2000,
    paired_bootstrap: int = 2000,
    paired_seed: int = 0,
    keep_fold_models: bool = True,
    floor: bool = True,
    annotations: Mapping[str, str | Path] | None = None,
    top_k: int = 8,
    parser=None,
) -> dict:
    """Train and score every method on ``splits``; write ``<output_dir>/compare/`` (module docstring).

    ``parser``: the training config (default: the ``monai.bundle`` config being run; from Python e.g.
    :func:`scripts.workflows.training.training_parser`); every fold of every method is trained by it.

    ``floor``: also score the pooled logistic-regression floor (:mod:`scripts.experiments.pooled_baseline`, mean +
    max pooled instance features) on the same folds; it gets a row and a paired test like every method.
    ``paired_bootstrap`` / ``paired_seed``: resamples (default 2000) and seed of the headline paired test
    (:func:`paired_tests`).

    Returns the comparison dict (also ``comparison.json``): ``rows`` (one per method), ``paired``
    (reference vs each method) and the cohort / settings description.
    """
    parser = config_parser_for(parser, output_dir, "compare_methods")
    methods = resolve_methods(methods)
    method_kwargs = dict(method_kwargs or {})
    keep_fold_models = as_bool(keep_fold_models, "keep_fold_models")
    if reference not in methods:
        logger.warning("reference method %r is not among the compared methods; using %r", reference, methods[0])
        reference = methods[0]
    methods = [reference] + [m for m in methods if m != reference]  # the reference heads the table
    out_dir = OutputLayout(output_dir).compare_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    dim = int(bags[0].load().shape[1])
    results: dict[str, Any] = {}
    rows = []
    bar = tqdm(methods, desc="methods", unit="method", dynamic_ncols=True)
    for name in bar:
        bar.set_postfix_str(name)
        kwargs = dict(method_kwargs.get(name) or {})
        start = time.perf_counter()
        try:
            overrides = method_config_overrides(name, kwargs, parser.get("network_def"))
            result = _run_cv(parser, overrides, name, bags, splits, out_dir / name if keep_fold_models else None,
                             n_bootstrap, keep_models=bool(annotations))
        except Exception as error:  # one method failing must not lose the others' results
            logger.exception("method %s failed", name)
            rows.append({"method": name, "status": f"failed: {type(error).__name__}: {error}"})
            continue
        results[name] = result
        summary = result.summary
        pooled = summary["pooled"]
        at_val = pooled.get("at_val_threshold") or {}
        row = {
            "method": name,
            "status": "ok",
            "params": count_parameters(name, dim, kwargs),
            "n_slides": summary["n_slides"],
            "n_patients": summary["n_patients"],
            "n_folds": len(summary["folds"]),
            "auc_mean": summary["mean"]["auc"],
            "auc_std": summary["std"]["auc"],
            "pooled_auc": pooled["auc"],
            "pooled_auc_ci_low": (pooled.get("auc_ci") or [None, None])[0],
            "pooled_auc_ci_high": (pooled.get("auc_ci") or [None, None])[1],
            "ci_method": pooled.get("ci_method"),
            "accuracy": at_val.get("accuracy"),
            "balanced_accuracy": at_val.get("balanced_accuracy"),
            "f1": at_val.get("f1"),
            "sensitivity": at_val.get("sensitivity"),
            "specificity": at_val.get("specificity"),
            "accuracy_at_0.5": pooled["at_0.5"]["accuracy"],
            "f1_at_0.5": pooled["at_0.5"]["f1"],
            "median_best_epoch": float(np.median([f["best_epoch"] for f in summary["folds"]])),
            "feature_norm": summary.get("feature_norm", "none"),
            "seconds": round(time.perf_counter() - start, 1),
            "network_kwargs": kwargs,
        }
        if not keep_fold_models:
            write_csv(OutputLayout(out_dir / name).oof_predictions, result.predictions)
        if annotations:
            row.update(localisation_columns(out_of_fold_localisation(bags, splits, result.models, annotations,
                                                                     out_dir / name, top_k, n_bootstrap,
                                                                     feature_norms=result.feature_norms)))
            result.models.clear()
        rows.append(row)
        bar.write(f"{name}: pooled AUC {_fmt(row['pooled_auc'])}, fold AUC {_fmt(row['auc_mean'])} ± {_fmt(row['auc_std'])}")
    bar.close()
    if as_bool(floor, "floor"):
        _add_floor(bags, splits, n_bootstrap, results, rows, out_dir)

    oof = merge_predictions({m: r.predictions for m, r in results.items()})
    paired = paired_tests(oof, reference, [m for m in [*methods, FLOOR_NAME] if m in results],
                          n_bootstrap=paired_bootstrap, seed=paired_seed)
    for row in rows:
        test = paired.get(row["method"])
        if test:
            row.update({f"vs_{reference}_{k}": v for k, v in test.items() if k != "method"})
    comparison = {
        "reference": reference,
        "methods": methods,
        "cohort": _cohort_description(bags, splits),
        "settings": {k: v for k, v in training_description(parser).items() if k != "network_def"},
        "method_kwargs": method_kwargs,
        "rows": rows,
        "paired_test": {"headline_p": "p_patient_bootstrap_holm", "test": PAIRED_TEST,
                        "resamples": int(paired_bootstrap), "seed": int(paired_seed),
                        "p_delong_independent_slides": DELONG_NOTE},
        "paired": paired,
    }
    comparison = nan_to_none(comparison)
    write_json(out_dir / "comparison.json", comparison)
    write_csv(out_dir / "comparison.csv", [_flat_row(r) for r in rows])
    if oof:
        write_csv(out_dir / "oof_predictions.csv", oof)
        curves = {m: ([r["label"] for r in oof], [r[f"prob_{m}"] for r in oof]) for m in results}
        plot_roc(curves, out_dir / "roc.png", title="Pooled out-of-fold ROC per method")
    markdown = comparison_markdown(comparison)
    with atomic_path(out_dir / "comparison.md") as tmp:
        Path(tmp).write_text(markdown)
    logger.info("comparison written to %s\n%s", out_dir, markdown)
    return comparison


def _add_floor(bags, splits, n_bootstrap, results: dict, rows: list, out_dir: Path) -> None:
    """The pooled logistic-regression floor on the same folds, as one more row (never stops the comparison)."""
    start = time.perf_counter()
    try:
        floor = pooled_cross_validation(bags, splits, n_bootstrap=n_bootstrap)
    except (ValueError, MemoryError) as error:
        logger.warning("pooled logistic-regression floor failed: %s", error)
        rows.append({"method": FLOOR_NAME, "status": f"failed: {type(error).__name__}: {error}"})
        return
    results[FLOOR_NAME] = SimpleNamespace(predictions=floor["predictions"], summary=floor["summary"])
    write_csv(OutputLayout(out_dir / FLOOR_NAME).oof_predictions, floor["predictions"])
    write_json(OutputLayout(out_dir / FLOOR_NAME).cv_summary, floor["summary"])
    summary, pooled = floor["summary"], floor["summary"]["pooled"]
    at_val = pooled.get("at_val_threshold") or {}
    dim = int(bags[0].load().shape[1])
    rows.append({
        "method": FLOOR_NAME, "status": "ok", "params": 2 * dim + 1, "n_slides": summary["n_slides"],
        "n_patients": summary["n_patients"], "n_folds": len(summary["folds"]), "auc_mean": summary["mean"]["auc"],
        "auc_std": summary["std"]["auc"], "pooled_auc": pooled["auc"],
        "pooled_auc_ci_low": (pooled.get("auc_ci") or [None, None])[0],
        "pooled_auc_ci_high": (pooled.get("auc_ci") or [None, None])[1], "ci_method": pooled.get("ci_method"),
        "accuracy": at_val.get("accuracy"), "balanced_accuracy": at_val.get("balanced_accuracy"), "f1": at_val.get("f1"),
        "sensitivity": at_val.get("sensitivity"), "specificity": at_val.get("specificity"),
        "accuracy_at_0.5": pooled["at_0.5"]["accuracy"], "f1_at_0.5": pooled["at_0.5"]["f1"], "median_best_epoch": None,
        "seconds": round(time.perf_counter() - start, 1), "network_kwargs": {"floor": FLOOR_DESCRIPTION},
    })  # fmt: skip


def _run_cv(parser, overrides, name, bags, splits, output_dir, n_bootstrap, keep_models=False):
    return config_cross_validation(bags, splits, output_dir=output_dir, n_bootstrap=n_bootstrap, parser=parser,
                                   overrides=overrides, run_prefix=f"{name}/", keep_models=keep_models)


def out_of_fold_localisation(bags: Sequence[Bag], splits: dict, models: Sequence[Any], annotations: Mapping[str, str | Path],
                             output_dir: str | Path, top_k: int = 8, n_bootstrap: int = 2000,
                             feature_norms: Sequence[Any] | None = None) -> dict:
    """Localisation outputs under ``output_dir`` from each annotated slide's out-of-fold attention
    (``models`` in the order of ``splits["folds"]``; ``feature_norms``: each fold's feature standardiser or
    None, as :class:`scripts.workflows.training.CVResult` gives them)."""
    by_id = {b.bag_id: b for b in bags}
    norms = list(feature_norms or []) + [None] * (len(models) - len(feature_norms or []))

    def features(bag, k):
        x = bag.load()
        return norms[k](x) if norms[k] is not None else x

    if models and bags and bag_attention(models[0], features(bags[0], 0)) is None:
        return {"n_slides": 0, "top_k": top_k, "attention": False}  # mean / max pooling: nothing to localise

    def slides():
        for k, (fold, model) in enumerate(zip(splits["folds"], models)):
            for slide_id in fold["test"]:
                bag = by_id.get(slide_id)
                if bag is None or not annotations.get(slide_id) or bag.features_path is None:
                    continue
                try:
                    coords, size = patch_geometry(bag.features_path)
                except (OSError, ValueError) as error:
                    logger.warning("localisation of %s: %s", slide_id, error)
                    continue
                yield SlideAttention(slide_id, bag.patient_id, bag.label, coords, size, bag_attention(model, features(bag, k)),
                                     Path(annotations[slide_id]))

    return localise_cohort(slides(), output_dir, top_k=top_k, n_bootstrap=n_bootstrap)


def localisation_columns(summary: Mapping[str, Any]) -> dict:
    """The comparison table's localisation columns from a localisation summary."""
    out = {"localisation_slides": summary.get("n_slides", 0), "top_k": summary.get("top_k")}
    for key in ("attention_auc", "top_k_hit_rate", "attention_mass_on_annotations"):
        ci = summary.get(f"{key}_ci") or [None, None]
        out.update({key: summary.get(key), f"{key}_ci_low": ci[0], f"{key}_ci_high": ci[1]})
    return out


def merge_predictions(predictions: Mapping[str, Sequence[dict]]) -> list[dict]:
    """One row per slide (slides every method predicted), ``prob_<method>`` columns, in slide order."""
    if not predictions:
        return []
    methods = list(predictions)
    by_method = {m: {r["slide_id"]: r for r in rows} for m, rows in predictions.items()}
    common = set.intersection(*(set(d) for d in by_method.values()))
    first = by_method[methods[0]]
    out = []
    for slide_id in sorted(common):
        base = first[slide_id]
        row = {k: base[k] for k in ("slide_id", "patient_id", "center", "label", "fold")}
        for m in methods:
            row[f"prob_{m}"] = float(by_method[m][slide_id]["prob"])
        out.append(row)
    return out


def paired_tests(oof: Sequence[dict], reference: str, methods: Sequence[str], n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """Reference vs each other method on the pooled out-of-fold predictions.

    Headline: ``p_patient_bootstrap`` (:data:`PAIRED_TEST`: :func:`scripts.metrics.paired.paired_bootstrap_auc`
    with the patients as clusters, ``n_bootstrap`` resamples, ``seed``) and its Holm adjustment over the
    comparisons, ``p_patient_bootstrap_holm``, which is the value to read when several methods are
    compared; ``auc_difference`` and its interval ``patient_bootstrap_ci_low/high``. The AUC is per slide
    (each slide's out-of-fold probability is one unit); the patients are only the resampling clusters.
    ``p_delong_independent_slides`` (with its Wald interval) is DeLong's test, which treats slides as
    independent: with several slides per patient its p is too small (tests/test_paired_stats.py measures
    how much); it is kept for comparison with papers that report it, never as the result.
    """
    if not oof or reference not in methods:
        return {}
    labels = np.array([int(r["label"]) for r in oof])
    groups = np.array([str(r["patient_id"]) for r in oof])
    ref = np.array([r[f"prob_{reference}"] for r in oof])
    out: dict[str, dict] = {}
    for m in methods:
        if m == reference:
            continue
        other = np.array([r[f"prob_{m}"] for r in oof])
        try:
            b = paired_bootstrap_auc(labels, ref, other, groups=groups, n_bootstrap=n_bootstrap, seed=seed)
            d = delong_test(labels, ref, other)
        except ValueError as error:
            logger.warning("paired test %s vs %s not possible: %s", reference, m, error)
            continue
        out[m] = {
            "method": m,
            "auc_difference": b.difference,
            "p_patient_bootstrap": b.p_value,
            "patient_bootstrap_ci_low": b.ci_low,
            "patient_bootstrap_ci_high": b.ci_high,
            "patient_bootstrap_resamples": b.n_bootstrap,
            "patient_bootstrap_patients": b.n_groups,
            "patient_bootstrap_seed": int(seed),
            "p_delong_independent_slides": d.p_value,
            "delong_independent_slides_ci_low": d.ci_low,
            "delong_independent_slides_ci_high": d.ci_high,
        }
    adjusted = holm([v["p_patient_bootstrap"] for v in out.values()])
    for value, p in zip(out.values(), adjusted):
        value["p_patient_bootstrap_holm"] = p
    return out


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    p = np.asarray(p_values, dtype=float)
    n = len(p)
    if n == 0:
        return []
    order = np.argsort(p)
    adjusted = np.empty(n)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (n - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def _flat_row(row: dict) -> dict:
    out = {k: v for k, v in row.items() if k != "network_kwargs"}
    out["network_kwargs"] = ";".join(f"{k}={v}" for k, v in (row.get("network_kwargs") or {}).items())
    return out


def _cohort_description(bags: Sequence[Bag], splits: dict) -> dict:
    labels = [b.label for b in bags]
    return {
        "n_slides": len(bags),
        "n_patients": len({b.patient_id for b in bags}),
        "n_positive": int(sum(1 for x in labels if x == 1)),
        "centers": sorted({b.center for b in bags if b.center}),
        "n_folds": len(splits["folds"]),
        "feature_dim": int(bags[0].load().shape[1]),
    }


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{float(value):.{digits}f}"


def _fmt_p(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def comparison_markdown(comparison: dict) -> str:
    """The comparison as a Markdown report (table + how to read it)."""
    ref = comparison["reference"]
    cohort = comparison["cohort"]
    settings = comparison["settings"]
    lines = [
        "# MIL methods compared on the same patient-level splits",
        "",
        f"Cohort: {cohort['n_slides']} slides, {cohort['n_patients']} patients, {cohort['n_positive']} positive; "
        f"{cohort['n_folds']}-fold cross-validation; {cohort['feature_dim']}-d features"
        + (f"; centres {', '.join(cohort['centers'])}" if cohort.get("centers") else "") + ".",
        f"Training (all methods alike): {settings.get('epochs')} epochs max, batch {settings.get('batch_size')} bags, "
        f"optimiser {_describe_optimizer(settings.get('optimizer'))}, selection on validation {settings.get('monitor')}, "
        f"patience {settings.get('patience')}, seed {settings.get('seed')}; input features "
        + ("standardised per fold (mean/std of the fold's training instances)" if settings.get("feature_norm") == "standardize"
           else "not standardised (feature_norm none)") + ".",
        "",
        f"| method | params | fold AUC mean ± std | pooled AUC [95% CI] | accuracy | F1 | ΔAUC {ref} − method [95% CI] | "
        "p, patient bootstrap (Holm) | p, DeLong (assumes independent slides) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in comparison["rows"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['method']} | – | {row.get('status')} | | | | | | |")
            continue
        test = comparison["paired"].get(row["method"])
        if row["method"] == ref:
            diff = delong = boot = "(reference)"
        elif test:
            diff = (f"{test['auc_difference']:+.3f} [{_fmt(test['patient_bootstrap_ci_low'])}, "
                    f"{_fmt(test['patient_bootstrap_ci_high'])}]")
            boot = _fmt_p(test["p_patient_bootstrap"])
            if len(comparison["paired"]) > 1:
                boot = f"{boot} (Holm {_fmt_p(test['p_patient_bootstrap_holm'])})"
            delong = _fmt_p(test["p_delong_independent_slides"])
        else:
            diff = delong = boot = "n/a"
        lines.append(
            f"| {row['method']} | {row['params']:,} | {_fmt(row['auc_mean'])} ± {_fmt(row['auc_std'])} | "
            f"{_fmt(row['pooled_auc'])} [{_fmt(row['pooled_auc_ci_low'])}, {_fmt(row['pooled_auc_ci_high'])}] | "
            f"{_fmt(row['accuracy'])} | {_fmt(row['f1'])} | {diff} | {boot} | {delong} |"
        )
    loc_rows = [r for r in comparison["rows"] if r.get("status") == "ok" and "localisation_slides" in r]
    if any(r["localisation_slides"] for r in loc_rows):
        k = loc_rows[0].get("top_k")
        n_loc = max(r["localisation_slides"] for r in loc_rows)
        lines += [
            "",
            f"Localisation: out-of-fold attention against the annotations, mean over {n_loc} "
            "annotated positive slides [95% CI resampling patients]",
            "",
            f"| method | attention AUC (patch touches an annotation) | top-{k} hit rate | attention mass on annotated patches |",
            "|---|---:|---:|---:|",
        ]
        for row in loc_rows:
            cells = [f"{_fmt(row.get(key))} [{_fmt(row.get(key + '_ci_low'))}, {_fmt(row.get(key + '_ci_high'))}]"
                     if row.get(key) is not None else "n/a (no attention)"
                     for key in ("attention_auc", "top_k_hit_rate", "attention_mass_on_annotations")]
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "How to read it: the pooled AUC is computed on every slide's out-of-fold probability (each slide",
        "scored once, by the fold model that never saw its patient); its 95% interval: "
        + _ci_methods(comparison["rows"]) + " (patients carry all their slides; positive and negative",
        "patients are resampled separately).",
        "Accuracy and F1 use each fold's threshold chosen on that fold's validation split (Youden).",
        f"ΔAUC is the pooled AUC of {ref} minus the method's (a per-slide AUC), with the 95% interval of a paired",
        "bootstrap that resamples patients with all their slides. The p to read is the patient bootstrap's",
        f"(two-sided, 'no difference'; {_resamples(comparison)}), Holm-adjusted when several methods are compared.",
        "The DeLong p treats slides as independent: with several slides per patient it is too small; it is shown",
        "only beside papers that report it. A large p on a small cohort means 'not shown', not 'equal'.",
        f"{FLOOR_NAME} is the floor: {FLOOR_DESCRIPTION}, fitted on each fold's training slides",
        "(threshold on its validation slides): a MIL method close to it adds little over pooling.",
        "",
    ]
    return "\n".join(lines)


def _resamples(comparison: dict) -> str:
    test = comparison.get("paired_test") or {}
    if "resamples" not in test:
        return "resamples as in comparison.json"
    return f"{test['resamples']} resamples, seed {test['seed']}"


def _ci_methods(rows) -> str:
    methods = sorted({r["ci_method"] for r in rows if r.get("ci_method")})
    return "; ".join(methods) if methods else "n/a"


def _describe_optimizer(value) -> str:
    if isinstance(value, dict):
        name = value.get("name", value.get("callable", "?"))
        return f"{name} lr {value.get('lr')} wd {value.get('weight_decay')}"
    return str(value)


__all__ = [
    "DEFAULT_METHODS", "load_bags", "config_parser_for", "resolve_methods", "compare_methods", "merge_predictions",
    "out_of_fold_localisation", "localisation_columns",
    "paired_tests", "holm", "comparison_markdown", "PAIRED_TEST", "DELONG_NOTE",
]  # fmt: skip
