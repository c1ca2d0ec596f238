"""Experiments over the training workflow, run by ``configs/compare.json`` on top of ``configs/train.json``.

- ``compare``: methods side by side on the same patient-level splits, with patient-level paired tests.
- ``ablation``: SMILE's threshold x factor grid.
- ``transfer``: train on one centre, test on each other centre.
- ``pooled_baseline``: the pooled logistic-regression floor (a method the comparison adds; not an experiment).

No experiment imports another (``tests/test_layout.py`` checks it): what they share lives in
``scripts.workflows.training`` (the one fold trainer) and ``scripts.networks.methods`` (the method switch).
"""
