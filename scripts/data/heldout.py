"""Is a cohort held out from a model's training data? Patients, slide ids and file contents of a cohort
against what fold checkpoints record of their training and validation data (``metadata``, written by
``scripts.workflows.training.data_provenance``):

* ``train_patient_ids`` / ``val_patient_ids``: a cohort patient among them is in-sample;
* ``train_slide_ids`` / ``val_slide_ids`` and ``training_slides`` (per slide: id, patient, part and the
  content fingerprints of its slide file and feature file, :mod:`scripts.formats.fingerprint`): a cohort
  slide with a training slide's id, or whose slide file or feature file has a training slide's
  fingerprint, is in-sample whatever its own slide and patient ids (a training slide re-keyed under a
  new patient, or the same file copied under another name). A slide-id match alone counts too, since
  ids name output files and are meant to be unique per slide; rename a genuinely different slide that
  happens to reuse a training slide's id.

:func:`check_overlap` refuses an in-sample cohort (:class:`OverlapError`, used by evaluation: one error
naming the cohort's matching rows and the fold that trained on them) or only warns (``refuse=False``:
inference, cross-centre transfer); either way it returns the record stamped into the output
(``"in_sample": true`` when patients or slides are shared). Checkpoints written before slide
fingerprints were recorded are still checked by patient and slide id, with a warning that copies under
new ids cannot be recognised.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

from scripts.formats.fingerprint import FINGERPRINT_METHOD, file_fingerprint
from scripts.utils.errors import BundleError

logger = logging.getLogger(__name__)

MAX_LISTED = 10  # matching rows named in an error or warning


class OverlapError(BundleError):
    """The cohort shares patients or slides with the training/validation data of the models being evaluated."""


def _record(checkpoint) -> dict:
    if not isinstance(checkpoint, dict):
        return {}
    record = checkpoint.get("metadata") if isinstance(checkpoint.get("metadata"), dict) else {}
    if "train_patient_ids" not in record and "train_patient_ids" in checkpoint:
        record = checkpoint  # older layout: top-level keys
    return record


def training_patients(checkpoint: dict) -> set[str] | None:
    """Patients a fold checkpoint was trained or validated on (None if it does not record them)."""
    record = _record(checkpoint)
    if "train_patient_ids" not in record:
        return None
    return {str(p) for p in record.get("train_patient_ids") or []} | {str(p) for p in record.get("val_patient_ids") or []}


def training_slides(checkpoint: dict) -> tuple[list[dict], bool]:
    """The slides a fold checkpoint was trained or validated on, as ``{"slide_id", "patient_id", "part",
    "slide_fingerprint", "features_fingerprint"}`` dicts, and whether it records fingerprints (False for
    checkpoints from before they were recorded: their slides carry ids only)."""
    record = _record(checkpoint)
    slides = record.get("training_slides")
    if isinstance(slides, list) and record.get("fingerprint_method") == FINGERPRINT_METHOD:
        return [dict(s) for s in slides if isinstance(s, dict)], True
    ids = [(str(s), "train") for s in record.get("train_slide_ids") or []]
    ids += [(str(s), "val") for s in record.get("val_slide_ids") or []]
    return [{"slide_id": s, "patient_id": None, "part": part, "slide_fingerprint": None, "features_fingerprint": None}
            for s, part in ids], False


def item_files(item) -> tuple[str, str, Path | None, Path | None]:
    """(slide id, patient id, slide file, feature file) of a cohort item: a :class:`scripts.data.bags.Bag`
    or a :class:`scripts.data.datalist.SlideRecord`."""
    if hasattr(item, "bag_id"):
        slide_id, slide, features = item.bag_id, getattr(item, "slide_path", None), getattr(item, "features_path", None)
    else:
        slide_id, slide, features = item.slide_id, getattr(item, "path", None), getattr(item, "features", None)
    as_path = (lambda p: Path(p) if isinstance(p, (str, Path)) and str(p) else None)  # noqa: E731
    return str(slide_id), str(item.patient_id), as_path(slide), as_path(features)


def cohort_overlap(cohort: Sequence, seen: Iterable[tuple[str, set[str] | None]]) -> dict:
    """Patients (and slides) of ``cohort`` (items with ``patient_id``) among the patients each model saw.

    ``seen``: (model name, patient set or None when unrecorded) pairs.
    """
    patients = {str(item.patient_id) for item in cohort}
    shared: set[str] = set()
    models, unchecked = [], []
    for name, trained_on in seen:
        if trained_on is None:
            unchecked.append(name)
            continue
        hit = patients & trained_on
        if hit:
            models.append(name)
            shared |= hit
    return {
        "n_patients": len(shared),
        "n_cohort_patients": len(patients),
        "n_slides": sum(1 for item in cohort if str(item.patient_id) in shared),
        "patients": sorted(shared),
        "models": models,
        "unchecked_models": unchecked,
    }


def slide_matches(cohort: Sequence, checkpoints: Sequence[tuple[str, dict]]) -> tuple[list[dict], list[str]]:
    """Cohort slides that are training or validation slides of a model, by slide id or by slide/feature
    file fingerprint, whatever their patient ids.

    Returns (one dict per cohort slide that matches: ``slide_id``, ``patient_id``, ``matches``: list of
    ``{"model", "training_slide", "training_patient", "part", "by"}``; names of the models that record no
    fingerprints). Cohort files are fingerprinted only when some model records fingerprints.
    """
    known = [(name, *training_slides(c)) for name, c in checkpoints]
    unfingerprinted = [name for name, slides, has_fp in known if not has_fp and slides]
    by_id: dict[str, list[tuple[str, dict]]] = {}
    by_slide_fp: dict[str, list[tuple[str, dict]]] = {}
    by_feature_fp: dict[str, list[tuple[str, dict]]] = {}
    for name, slides, _ in known:
        for s in slides:
            by_id.setdefault(str(s["slide_id"]), []).append((name, s))
            if s.get("slide_fingerprint"):
                by_slide_fp.setdefault(s["slide_fingerprint"], []).append((name, s))
            if s.get("features_fingerprint"):
                by_feature_fp.setdefault(s["features_fingerprint"], []).append((name, s))
    fingerprinting = bool(by_slide_fp or by_feature_fp)
    found = []
    for item in cohort:
        slide_id, patient_id, slide, features = item_files(item)
        hits: dict[tuple[str, str], dict] = {}

        def add(candidates, how):
            for name, s in candidates:
                hit = hits.setdefault((name, str(s["slide_id"])), {
                    "model": name, "training_slide": str(s["slide_id"]), "training_patient": s.get("patient_id"),
                    "part": s.get("part"), "by": []})
                if how not in hit["by"]:
                    hit["by"].append(how)

        add(by_id.get(slide_id, []), "slide id")
        if fingerprinting:
            add(by_slide_fp.get(file_fingerprint(slide), []) if slide else [], "slide file content")
            add(by_feature_fp.get(file_fingerprint(features), []) if features else [], "feature file content")
        if hits:
            found.append({"slide_id": slide_id, "patient_id": patient_id, "matches": list(hits.values())})
    return found, unfingerprinted


def describe_match(match: dict) -> str:
    """One line: which cohort slide matches which training slide of which model, and how."""
    groups: dict[tuple, list[str]] = {}
    for hit in match["matches"]:
        key = (hit["training_slide"], hit["training_patient"], hit["part"], tuple(hit["by"]))
        groups.setdefault(key, []).append(hit["model"])
    parts = []
    for (training_slide, training_patient, part, by), models in groups.items():
        whose = f" (patient {training_patient!r})" if training_patient else ""
        role = "validation" if part == "val" else "training"
        how = " and ".join(by) if len(by) < 3 else ", ".join(by[:-1]) + " and " + by[-1]
        parts.append(f"same {how} as {role} slide {training_slide!r}{whose} of {', '.join(models)}")
    return f"slide {match['slide_id']!r} (patient {match['patient_id']!r}): " + "; ".join(parts)


def check_overlap(cohort: Sequence, checkpoints: Sequence[tuple[str, dict]], source, refuse: bool = True,
                  allow_overlap: bool = False, what: str = "evaluation") -> dict:  # fmt: skip
    """Refuse (``refuse`` and not ``allow_overlap``: :class:`OverlapError`) or warn about a cohort that
    shares patients or slides (by id or file content) with the training/validation data of
    ``checkpoints`` ((name, checkpoint dict) pairs from ``source``); returns the overlap record for the output."""
    overlap = cohort_overlap(cohort, [(name, training_patients(c)) for name, c in checkpoints])
    matched, unfingerprinted = slide_matches(cohort, checkpoints)
    unfingerprinted = [m for m in unfingerprinted if m not in overlap["unchecked_models"]]
    log = logger.warning if refuse else logger.info
    if overlap["unchecked_models"]:
        log("%s: %d model(s) from %s do not record their training patients (older checkpoints): %s; cannot check "
            "that this cohort is held out", what, len(overlap["unchecked_models"]), source,
            ", ".join(overlap["unchecked_models"][:5]))  # fmt: skip
    if unfingerprinted:
        log("%s: %d model(s) from %s record their training slide ids but not the slides' file fingerprints (older "
            "checkpoints): %s; a training slide copied or re-listed under a new slide and patient id cannot be "
            "recognised (retrain to record them)", what, len(unfingerprinted), source, ", ".join(unfingerprinted[:5]))  # fmt: skip
    if overlap["n_patients"] or matched:
        sentences = []
        if overlap["n_patients"]:
            sentences.append(
                f"{overlap['n_patients']} of the cohort's {overlap['n_cohort_patients']} patients "
                f"({overlap['n_slides']} slides; e.g. {', '.join(overlap['patients'][:5])}) were in the training or "
                f"validation data of the models from {source} ({', '.join(overlap['models'][:10])})"
            )
        if matched:
            models = sorted({h["model"] for m in matched for h in m["matches"]})
            sentences.append(
                f"{len(matched)} of the cohort's {len(cohort)} slides are training or validation slides of the models "
                f"from {source} ({', '.join(models[:10])}) by slide id or file content, whatever their patient ids"
            )
        message = "; ".join(sentences) + ": their scores are in-sample."
        rows = [describe_match(m) for m in matched[:MAX_LISTED]]
        if len(matched) > MAX_LISTED:
            rows.append(f"... and {len(matched) - MAX_LISTED} more")
        listing = ("\n  - " + "\n  - ".join(rows)) if rows else ""
        if refuse and not allow_overlap:
            raise OverlapError(
                f"{message} Evaluate a held-out cohort (--datalist with patients and slide files none of the models "
                "saw); the out-of-fold result of the training cohort is in <training output_dir>/cv/summary.json. To "
                f"score this cohort anyway pass --allow_overlap true (the output is then stamped in-sample).{listing}"
            )
        logger.warning("%s: %s%s%s", what, message,
                       " --allow_overlap true: scored anyway; the output is stamped in-sample." if refuse else "",
                       listing)  # fmt: skip
    overlap["allowed"] = bool(allow_overlap)
    overlap["n_matched_slides"] = len(matched)
    overlap["matched_slides"] = [{"slide_id": m["slide_id"], "patient_id": m["patient_id"],
                                  "matches": m["matches"][:10]} for m in matched[:50]]  # fmt: skip
    overlap["unfingerprinted_models"] = unfingerprinted
    overlap["fingerprint_method"] = FINGERPRINT_METHOD
    overlap["in_sample"] = overlap["n_patients"] > 0 or bool(matched)
    overlap["patients"] = overlap["patients"][:50]
    return overlap


__all__ = ["OverlapError", "training_patients", "training_slides", "item_files", "cohort_overlap", "slide_matches",
           "describe_match", "check_overlap"]
