"""Multi-process (torchrun) helpers: one process per GPU, DDP on packed MIL bags, rank 0 writes.

``torchrun --nproc_per_node=N`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; configs/multi_gpu_train.json
calls :func:`init_distributed` first and :func:`finalize_distributed` last, the training code asks
:func:`is_main_process` before writing and wraps its network with :func:`wrap_ddp`. Without torchrun
(WORLD_SIZE unset or 1) everything here is a no-op, so the same code trains on one device.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that writes files and logs results."""
    return rank() == 0


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the torchrun process group (nccl on GPUs, gloo on the CPU); returns this process's device.

    Idempotent; with WORLD_SIZE <= 1 nothing is initialised.
    """
    device = local_device()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        torch.distributed.init_process_group(backend=backend)
        if device.type == "cpu":  # ranks share the CPU: split its cores between them
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
        logger.info("rank %d of %d (%s) on %s", rank(), world_size(), backend, device)
    return device


def finalize_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class PackedForward(nn.Module):
    """Calls ``forward_packed`` of a MIL network from ``forward``, so DDP (which hooks ``forward``)
    synchronises the gradients of every output the training loss uses (logits, attention, aux terms)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> dict:
        if hasattr(self.network, "forward_packed"):
            return self.network.forward_packed(x, bag_index, n_bags)
        return {"logits": self.network(x, bag_index, n_bags)}


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around :class:`PackedForward` when running under torchrun, else ``model``."""
    if world_size() <= 1:
        return model

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(PackedForward(model), device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The MIL network inside DDP / :class:`PackedForward` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif isinstance(model, PackedForward):
            model = model.network
        else:
            return model


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, e.g. before validation, so
    every rank evaluates the very same network and takes the same early-stopping decision."""
    if world_size() <= 1:
        return
    for buffer in unwrap(model).buffers():
        torch.distributed.broadcast(buffer.data, src=0)
