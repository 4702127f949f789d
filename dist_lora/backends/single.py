"""One process, no sharding: the model and optimizer as the user built them."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from dist_lora.backends.base import Backend, LocalPiece, from_files, full_pieces, load_torch_optim_state, materialize
from dist_lora.model import compute_device


class SingleBackend(Backend):
    name = "single"

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, bias: str, *, bf16_autocast: bool = False
    ):
        super().__init__(model, optimizer, bias)
        self.bf16_autocast = bf16_autocast
        """``parallel.mixed_precision: bf16``: the forward and its loss run under ``torch.autocast`` to bf16, as HF
        Trainer's ``bf16=True`` does; the weights, their gradients and the optimizer stay in ``model.dtype``."""

    def describe(self) -> str:
        return f"{self.name} (autocast to bfloat16)" if self.bf16_autocast else self.name

    @classmethod
    def wrap(
        cls, parallel, model, make_optimizer, bias, *, micro_batch_size, grad_accum, weights=None, max_grad_norm=None
    ):  # type: ignore[no-untyped-def]
        if weights is not None:  # built on the meta device (a base to quantize): read it one tensor at a time
            materialize(model, weights, from_files(model, weights))
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        return cls(model, optimizer, bias, bf16_autocast=parallel.mixed_precision == "bf16")

    @classmethod
    def recognise(cls, model, optimizer, bias):  # type: ignore[no-untyped-def]
        return cls(model, optimizer, bias)  # a plain module: the last one asked (its loop's own precision)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Where the forward runs (backward runs outside it, as torch's AMP recipe says: autograd gives each op's
        backward the dtypes of its forward)."""
        if not self.bf16_autocast:
            return contextlib.nullcontext()
        return torch.autocast(compute_device().type, dtype=torch.bfloat16)

    def forward(self, batch: dict[str, Any], *, last_micro: bool = True) -> torch.Tensor:
        with self.autocast():
            return self.model(**batch).loss

    def outputs(self, batch: dict[str, Any]) -> Any:
        with self.autocast():
            return self.model(**batch)

    def local_pieces(self) -> list[LocalPiece]:
        return full_pieces(self, owner=self.rank == 0)

    def load_full(self, p: nn.Parameter, full: dict[str, torch.Tensor], step: float | None) -> None:
        with torch.no_grad():
            p.copy_(full["weight"].view_as(p))
        if self.optimizer is not None:
            load_torch_optim_state(self.optimizer, p, full, step, lambda t: t.view_as(p).to(p).clone())
