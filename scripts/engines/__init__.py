"""What runs a MIL network over bags, shared by every workflow and experiment.

- ``mil``: the packed-bag iterations of MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``, the bag
  loader, the optimiser factory (Ranger 20.4.11 or any timm name) and :func:`~scripts.engines.mil.predict`.
- ``handlers``: the ignite handlers ``configs/train.json`` adds to MONAI's (best-epoch selection, history).
- ``ensemble``: :class:`FoldEnsemble`, a cross-validation run's fold models with one threshold rule.
"""
