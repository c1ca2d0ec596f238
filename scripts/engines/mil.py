"""Running a MIL network over packed bags: the pieces ``configs/train.json`` plugs into MONAI's engines.

* :func:`mil_train_iteration` / :func:`mil_eval_iteration`: the ``iteration_update`` of the
  :class:`monai.engines.SupervisedTrainer` and :class:`monai.engines.SupervisedEvaluator`. A batch is a
  packed set of bags (:func:`scripts.data.bags.collate_bags`: all instances in one tensor, a bag index per
  instance); a network returns one logit per bag; the loss is bag BCE-with-logits plus the network's
  ``training_loss_terms``.
* :func:`bag_loader`: the DataLoader of packed bags (a ``DistributedSampler`` under torchrun).
* :func:`create_optimizer`: Ranger 20.4.11 (the SMILE optimiser) or any timm optimiser by name.
* :func:`predict`: bag probabilities of a trained network, outside any engine.
* :data:`THRESHOLD_SOURCE` / :data:`THRESHOLD_FALLBACK`: how a fold's operating threshold was chosen, as
  written into its checkpoint by the trainer and read by :class:`scripts.engines.ensemble.FoldEnsemble`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from scripts.data.bags import Bag, BagDataset, collate_bags
from scripts.optim import Ranger
from scripts.utils.distributed import unwrap

THRESHOLD_SOURCE = "youden on the fold's validation slides"
THRESHOLD_FALLBACK = "fallback 0.5 (validation set empty or one class)"
THRESHOLD_KEYS = ("accuracy", "balanced_accuracy", "f1", "sensitivity", "specificity")


def create_optimizer(
    params, name: str = "ranger", lr: float = 2e-4, weight_decay: float = 1e-5,
    betas=(0.95, 0.999), eps: float = 1e-5, **kwargs,
):  # fmt: skip
    """An optimiser by name for a model or parameters: ``ranger`` or any timm name.

    ``ranger`` (the default, the official SMILE optimiser) is :class:`scripts.optim.Ranger`: Ranger
    20.4.11 = RAdam (betas 0.95/0.999, eps 1e-5, rectified when the SMA length exceeds 5) + Lookahead
    (k 6, alpha 0.5) + gradient centralisation on tensors with more than one dimension + decoupled
    weight decay on every parameter. Every other name goes to timm's factory
    (``timm.optim.create_optimizer_v2``: ``lookahead_radam``, ``adam``, ``adamw``, ...); note that timm's
    ``lookahead_radam`` is *not* Ranger 20.4.11 (no gradient centralisation, coupled L2 decay, no
    decay on biases and normalisation parameters).

    Note: RAdam's rectification is an implicit warm-up of roughly 1/(1 - beta2) steps; on a small
    cohort (a few optimiser steps per epoch) it learns slowly in the first hundreds of steps.
    """
    if str(name).lower() == "ranger":
        if isinstance(params, nn.Module):
            params = params.parameters()
        return Ranger(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **kwargs)
    return create_optimizer_v2(params, opt=name, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **kwargs)


def ranger(params, lr: float = 2e-4, weight_decay: float = 1e-5, betas=(0.95, 0.999), eps: float = 1e-5):
    """Ranger 20.4.11 with the SMILE settings (:class:`scripts.optim.Ranger`); see :func:`create_optimizer`."""
    return create_optimizer(params, "ranger", lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def _forward(model: nn.Module, x: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> dict:
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # wraps scripts.utils.distributed.PackedForward
        return model(x, bag_index, n_bags)
    if hasattr(model, "forward_packed"):
        return model.forward_packed(x, bag_index, n_bags)
    return {"logits": model(x, bag_index, n_bags)}


def _to_device(batch: dict, device: torch.device, non_blocking: bool):
    return (
        batch["features"].to(device, non_blocking=non_blocking),
        batch["bag_index"].to(device, non_blocking=non_blocking),
        int(batch["n_bags"]),
        batch["label"].to(device, non_blocking=non_blocking),
    )


def mil_train_iteration(engine, batch: dict) -> list[dict]:
    """One optimiser step on a packed batch: bag BCE plus the network's ``training_loss_terms``.

    The output is a one-item list (the packed batch is one item): MONAI handlers read it with
    ``from_engine(["loss"], first=True)``, as they read a decollated batch (e.g. the ``MLFlowHandler``
    that ``--tracking mlflow`` adds)."""
    model = engine.network
    if not model.training:
        model.train()
    x, bag_index, n_bags, labels = _to_device(batch, engine.state.device, engine.non_blocking)
    if x.shape[0] < 2:  # BatchNorm cannot train on a single instance; skip this (one-patch, one-bag) batch
        return [{"label": labels, "pred": torch.zeros_like(labels), "loss": torch.tensor(math.nan), "n_bags": n_bags}]
    engine.optimizer.zero_grad(set_to_none=True)
    out = _forward(model, x, bag_index, n_bags)
    loss = engine.loss_function(out["logits"], labels)
    inner = unwrap(model)
    extra = inner.training_loss_terms(out, x, bag_index, labels) if hasattr(inner, "training_loss_terms") else {}
    total = loss + sum(extra.values()) if extra else loss
    total.backward()
    engine.optimizer.step()
    return [{"label": labels, "pred": out["logits"].detach(), "loss": total.detach(), "n_bags": n_bags}]


def mil_eval_iteration(engine, batch: dict) -> dict:
    """Predict a packed batch in eval mode: ``pred`` probabilities, ``logits``, ``label``."""
    model = engine.network
    if model.training:
        model.eval()
    x, bag_index, n_bags, labels = _to_device(batch, engine.state.device, engine.non_blocking)
    with torch.no_grad():
        logits = _forward(model, x, bag_index, n_bags)["logits"].float()
    return {"pred": torch.sigmoid(logits), "logits": logits, "label": labels, "bag_id": batch["bag_id"]}


def bag_loader(
    dataset, batch_size: int = 12, shuffle: bool = False, seed: int = 0, num_workers: int = 0, device: Any = "cpu",
    distributed: bool = False,
) -> DataLoader:
    """A DataLoader of packed bags (:func:`scripts.data.bags.collate_bags`) over a ``BagDataset`` or bags.

    With ``distributed`` and ``shuffle`` under torchrun, each rank trains on its share of the bags through a
    ``DistributedSampler`` (MONAI's trainer calls ``set_epoch`` every epoch); validation and prediction
    loaders stay whole, so every rank computes the same metrics.
    """
    if not isinstance(dataset, torch.utils.data.Dataset):
        dataset = BagDataset(dataset)
    generator = torch.Generator().manual_seed(int(seed))
    sampler = None
    if distributed and shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler, shuffle = DistributedSampler(dataset, shuffle=True, seed=int(seed)), False
    return DataLoader(
        dataset, batch_size=int(batch_size), shuffle=shuffle, sampler=sampler, collate_fn=collate_bags,
        num_workers=int(num_workers), generator=generator, pin_memory=torch.device(device).type == "cuda",
        persistent_workers=int(num_workers) > 0,
    )  # fmt: skip


def predict(model: nn.Module, bags: Sequence[Bag], batch_size: int = 12, device: Any = None, num_workers: int = 0) -> np.ndarray:
    """Probabilities (sigmoid of the bag logit) of ``bags``, in order, in eval mode."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    model = model.to(device).eval()
    loader = DataLoader(BagDataset(bags), batch_size=batch_size, shuffle=False, collate_fn=collate_bags, num_workers=num_workers)
    out = []
    with torch.no_grad():
        for batch in loader:
            x, bag_index, n_bags, _ = _to_device(batch, device, False)
            out.append(torch.sigmoid(_forward(model, x, bag_index, n_bags)["logits"].float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)
