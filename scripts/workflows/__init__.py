"""The bundle's workflows, one module each, run by ``configs/*.json`` (``python -m monai.bundle run``).

Each is a public per-slide (or per-fold) function plus a thin loop:

- ``preprocess``: slide -> tissue mask -> patch grid (``preprocess_slide``; ``configs/preprocess.json``).
- ``extract``: patch grid -> frozen encoder -> one feature file per slide (``extract_slide``; ``extract.json``).
- ``training``: one fold trainer over ``train.json``'s ``train``/``validate`` sections; cross-validation.
- ``evaluate``: a held-out cohort scored by a cross-validation run's fold ensemble (``evaluate.json``).
- ``predict``: one slide in, one prediction out (``SlidePredictor``, ``predict_slide``).
- ``inference``: a datalist of slides through ``predict`` (``configs/inference.json``).
- ``publish_model``: a trained model as the bundle's ``models/model.pt``.
"""
