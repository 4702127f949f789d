"""Backends: how the model is sharded (fsdp, deepspeed, ddp, single). Everything engine-specific lives here."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dist_lora.backends.base import Backend, LocalPiece
from dist_lora.config import ParallelConfig


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None, bias: str) -> Backend:
    """A Backend view of a model the user already wrapped: DeepSpeedEngine, FSDP2, DDP, or a plain module."""
    if type(model).__name__ == "DeepSpeedEngine":
        from dist_lora.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(model, model.optimizer, bias)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        from dist_lora.backends.ddp import DDPBackend

        return DDPBackend(model, optimizer, bias)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        from dist_lora.backends.fsdp import FSDPBackend

        return FSDPBackend(model, optimizer, bias)
    from dist_lora.backends.single import SingleBackend

    return SingleBackend(model, optimizer, bias)


def build(
    parallel: ParallelConfig,
    model: nn.Module,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    *,
    bias: str,
    micro_batch_size: int,
    grad_accum: int,
) -> Backend:
    """Wrap a LoRA model for ``parallel.backend`` and create its optimizer over the trainable parameters."""
    name = parallel.backend
    if name == "single":
        from dist_lora.backends.single import SingleBackend

        params = [p for p in model.parameters() if p.requires_grad]
        return SingleBackend(model, make_optimizer(params), bias)
    if name == "ddp":
        from dist_lora.backends.ddp import DDPBackend

        return DDPBackend.wrap(model, make_optimizer, bias)
    if name == "fsdp":
        from dist_lora.backends.fsdp import FSDPBackend

        return FSDPBackend.wrap(model, make_optimizer, bias, mixed_precision=parallel.mixed_precision)
    if name == "deepspeed":
        from dist_lora.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend.wrap(
            model,
            make_optimizer,
            bias,
            zero_stage=parallel.zero_stage,
            micro_batch_size=micro_batch_size,
            grad_accum=grad_accum,
            bf16=parallel.mixed_precision == "bf16",
            extra_config=parallel.deepspeed_config,
        )
    raise ValueError(f"parallel.backend must be one of fsdp, deepspeed, ddp, single (got {name!r})")


__all__ = ["Backend", "LocalPiece", "attach", "build"]
