"""Backends: how the model is sharded (fsdp, deepspeed, ddp, single). Everything engine-specific lives here."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dist_lora.backends.base import Backend, LocalPiece
from dist_lora.config import ParallelConfig
from dist_lora.weights import BaseWeights

# parallel.backend -> (module, class). attach() asks them, in this order, whether they wrapped a model: the
# first that did gives the view (single recognises any module, so it comes last).
REGISTRY: dict[str, tuple[str, str]] = {
    "deepspeed": ("dist_lora.backends.deepspeed", "DeepSpeedBackend"),
    "ddp": ("dist_lora.backends.ddp", "DDPBackend"),
    "fsdp": ("dist_lora.backends.fsdp", "FSDPBackend"),
    "single": ("dist_lora.backends.single", "SingleBackend"),
}


def backend_class(name: str) -> type[Backend]:
    """The Backend class for a ``parallel.backend`` name (its module imported on first use)."""
    if name not in REGISTRY:
        raise ValueError(f"parallel.backend must be one of {', '.join(REGISTRY)} (got {name!r})")
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def attach(model: nn.Module, optimizer: Any, bias: str) -> Backend:
    """A Backend view of a model the user (or HF Trainer) already wrapped: DeepSpeed ZeRO, DDP, FSDP2, or a plain
    module; ``optimizer`` as the user holds it (accelerate's wrappers too: :func:`unwrap_optimizer`)."""
    optimizer = unwrap_optimizer(optimizer)
    for name in REGISTRY:
        backend = backend_class(name).recognise(model, optimizer, bias)
        if backend is not None:
            return backend
    raise AssertionError("unreachable: the single backend recognises any module")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer under accelerate's wrappers (``AcceleratedOptimizer``, over a torch optimizer; under DeepSpeed
    ``DeepSpeedOptimizerWrapper``, over the ZeRO optimizer), which passes ``step`` and ``state`` through to it: a
    step records, and a load checks, the optimizer that keeps the state (AdamW), not the wrapper's class."""
    while (
        type(optimizer).__module__.startswith("accelerate.")
        and getattr(optimizer, "optimizer", optimizer) is not optimizer
    ):
        optimizer = optimizer.optimizer
    return optimizer


def build(
    parallel: ParallelConfig,
    model: nn.Module,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    *,
    bias: str,
    micro_batch_size: int,
    grad_accum: int,
    weights: BaseWeights | None = None,
    max_grad_norm: float | None = None,
) -> Backend:
    """Wrap a LoRA model for ``parallel.backend`` and create its optimizer over the trainable parameters
    (``weights``: the base's files, for a model that ``load_base`` built on the meta device)."""
    backend = backend_class(parallel.backend).wrap(
        parallel,
        model,
        make_optimizer,
        bias,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        weights=weights,
        max_grad_norm=max_grad_norm,
    )
    backend.ready()
    return backend


__all__ = ["REGISTRY", "Backend", "LocalPiece", "attach", "backend_class", "build", "unwrap_optimizer"]
