"""Is a cohort held out from a model's training data? Patient overlap between a cohort and the
training/validation data recorded in fold checkpoints (``metadata`` ``train_patient_ids``/``val_patient_ids``,
written by ``scripts.training.data_provenance``).

:func:`check_overlap` refuses an overlapping cohort (:class:`OverlapError`, used by evaluation) or only
warns (``refuse=False``: inference, cross-centre transfer); either way it returns the record stamped into
the output (``"in_sample": true`` when patients are shared).
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

from scripts.errors import BundleError

logger = logging.getLogger(__name__)


class OverlapError(BundleError):
    """The cohort shares patients with the training/validation data of the models being evaluated."""


def training_patients(checkpoint: dict) -> set[str] | None:
    """Patients a fold checkpoint was trained or validated on (None if it does not record them)."""
    if not isinstance(checkpoint, dict):
        return None
    record = checkpoint.get("metadata") if isinstance(checkpoint.get("metadata"), dict) else {}
    if "train_patient_ids" not in record:
        record = checkpoint  # older layout: top-level keys
    if "train_patient_ids" not in record:
        return None
    return {str(p) for p in record.get("train_patient_ids") or []} | {str(p) for p in record.get("val_patient_ids") or []}


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


def check_overlap(cohort: Sequence, checkpoints: Sequence[tuple[str, dict]], source, refuse: bool = True,
                  allow_overlap: bool = False, what: str = "evaluation") -> dict:  # fmt: skip
    """Refuse (``refuse`` and not ``allow_overlap``: :class:`OverlapError`) or warn about a cohort that
    shares patients with the training/validation data of ``checkpoints`` ((name, checkpoint dict) pairs
    from ``source``); returns the overlap record for the output."""
    overlap = cohort_overlap(cohort, [(name, training_patients(c)) for name, c in checkpoints])
    if overlap["unchecked_models"]:
        log = logger.warning if refuse else logger.info
        log("%s: %d model(s) from %s do not record their training patients (older checkpoints): %s; cannot check "
            "that this cohort is held out", what, len(overlap["unchecked_models"]), source,
            ", ".join(overlap["unchecked_models"][:5]))  # fmt: skip
    if overlap["n_patients"]:
        message = (
            f"{overlap['n_patients']} of the cohort's {overlap['n_cohort_patients']} patients "
            f"({overlap['n_slides']} slides; e.g. {', '.join(overlap['patients'][:5])}) were in the training or "
            f"validation data of the models from {source} ({', '.join(overlap['models'][:10])}): their scores are "
            "in-sample."
        )
        if refuse and not allow_overlap:
            raise OverlapError(
                f"{message} Evaluate a held-out cohort (--datalist with patients none of the models saw); the "
                "out-of-fold result of the training cohort is in <training output_dir>/cv/summary.json. To score "
                "this cohort anyway pass --allow_overlap true (the output is then stamped in-sample)."
            )
        logger.warning("%s: %s%s", what, message,
                       " --allow_overlap true: scored anyway; the output is stamped in-sample." if refuse else "")  # fmt: skip
    overlap["allowed"] = bool(allow_overlap)
    overlap["in_sample"] = overlap["n_patients"] > 0
    overlap["patients"] = overlap["patients"][:50]
    return overlap


__all__ = ["OverlapError", "training_patients", "cohort_overlap", "check_overlap"]
