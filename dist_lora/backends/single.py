"""One process, no sharding: the model and optimizer as the user built them."""

from __future__ import annotations

import torch
from torch import nn

from dist_lora.backends.base import Backend, LocalPiece, from_files, full_pieces, load_torch_optim_state, materialize


class SingleBackend(Backend):
    name = "single"

    @classmethod
    def wrap(
        cls, parallel, model, make_optimizer, bias, *, micro_batch_size, grad_accum, weights=None, max_grad_norm=None
    ):  # type: ignore[no-untyped-def]
        if weights is not None:  # built on the meta device (a base to quantize): read it one tensor at a time
            materialize(model, weights, from_files(model, weights))
        return cls(model, make_optimizer([p for p in model.parameters() if p.requires_grad]), bias)

    @classmethod
    def recognise(cls, model, optimizer, bias):  # type: ignore[no-untyped-def]
        return cls(model, optimizer, bias)  # a plain module: the last one asked

    def local_pieces(self) -> list[LocalPiece]:
        return full_pieces(self, owner=self.rank == 0)

    def load_full(self, p: nn.Parameter, full: dict[str, torch.Tensor], step: float | None) -> None:
        with torch.no_grad():
            p.copy_(full["weight"].view_as(p))
        if self.optimizer is not None:
            load_torch_optim_state(self.optimizer, p, full, step, lambda t: t.view_as(p).to(p).clone())
