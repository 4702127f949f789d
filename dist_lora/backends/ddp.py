"""DistributedDataParallel: every rank holds the whole adapter; rank 0's copy is the one saved."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist_lora.backends.base import from_files, materialize
from dist_lora.backends.single import SingleBackend


class DDPBackend(SingleBackend):
    name = "ddp"

    @classmethod
    def wrap(
        cls, parallel, model, make_optimizer, bias, *, micro_batch_size, grad_accum, weights=None, max_grad_norm=None
    ):  # type: ignore[no-untyped-def]
        if weights is not None:  # built on the meta device (a base to quantize): read it one tensor at a time
            materialize(model, weights, from_files(model, weights))
        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        params = [p for p in ddp.parameters() if p.requires_grad]
        return cls(ddp, make_optimizer(params), bias, bf16_autocast=parallel.mixed_precision == "bf16")

    @classmethod
    def recognise(cls, model, optimizer, bias):  # type: ignore[no-untyped-def]
        return cls(model, optimizer, bias) if isinstance(model, nn.parallel.DistributedDataParallel) else None

    def forward(self, batch: dict[str, Any], *, last_micro: bool = True) -> torch.Tensor:
        # DDP decides at forward time whether this backward all-reduces; only the last micro-batch does.
        self.model.require_backward_grad_sync = last_micro
        return super().forward(batch, last_micro=last_micro)
