"""Backends: how the model is sharded (fsdp, deepspeed, ddp, single). Everything engine-specific lives here."""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.backends.base import Backend, LocalPiece


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None, bias: str) -> Backend:
    """A Backend view of a model the user already wrapped: DeepSpeedEngine, FSDP2, DDP, or a plain module."""
    if type(model).__name__ == "DeepSpeedEngine":
        from dist_lora.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(model, optimizer if optimizer is not None else model.optimizer, bias)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        from dist_lora.backends.ddp import DDPBackend

        return DDPBackend(model, optimizer, bias)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from dist_lora.backends.fsdp import FSDPBackend

        return FSDPBackend(model, optimizer, bias)
    from dist_lora.backends.single import SingleBackend

    return SingleBackend(model, optimizer, bias)


__all__ = ["Backend", "LocalPiece", "attach"]
