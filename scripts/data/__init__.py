"""A cohort as the trainer sees it: rows of a datalist, bags of instance features, splits, and the checks
that keep evaluation honest.

- ``datalist``: the datalist CSV (slide, label, patient, centre, annotations), every problem reported at once.
- ``bags``: :class:`Bag` (one slide's features) from a datalist or a MUSK-style ``.npz``; packed-bag batches.
- ``splits``: patient-level cross-validation splits (stratified, grouped), saved and reloaded.
- ``feature_norm``: the per-fold feature standardiser (fitted on a fold's training bags only).
- ``heldout``: refuses an evaluation cohort holding training slides (by id or file content).
"""
