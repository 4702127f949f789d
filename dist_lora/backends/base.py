"""The small interface every backend implements: train a step, expose the local adapter shards, load full ones.

The trainer and the gather/scatter code see only this interface. A backend describes, for each adapter tensor,
which contiguous range of the flattened full tensor this rank holds (``LocalPiece``); the gather moves those
pieces to rank 0 in buckets, and on load each backend cuts its own range out of the full tensors it is given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dist_lora.constants import OPTIM_TENSOR_FIELDS, WEIGHT_FIELD
from dist_lora.lora import adapter_parameters, full_shape


@dataclass
class LocalPiece:
    """What this rank holds of one adapter tensor: elements [offset, offset + numel) of the flattened tensor."""

    key: str
    shape: torch.Size
    offset: int
    fields: dict[str, torch.Tensor]
    """1-D fp32 tensors of equal length, one per field ("weight", "exp_avg", "exp_avg_sq")."""
    step: float | None = None
    """Adam's step count for this tensor, or None when the optimizer holds no state yet."""

    @property
    def numel(self) -> int:
        return next(iter(self.fields.values())).numel() if self.fields else 0


class Backend(ABC):
    """A wrapped model and its optimizer, seen through what training and checkpointing need."""

    name: str = "base"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, bias: str):
        self.model: Any = model  # the wrapped module: DDP, DeepSpeedEngine, FSDP2 module or plain
        self.optimizer = optimizer
        self.bias = bias

    # ------------------------------------------------------------------------------------------ topology

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def device(self) -> torch.device:
        """Where collective buffers live (CUDA for NCCL, CPU for gloo)."""
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def adapter(self) -> dict[str, nn.Parameter]:
        """The adapter's parameters by canonical key (found once per bias mode: a wrapped model keeps them)."""
        cache = self.__dict__.setdefault("_adapter_cache", {})
        if self.bias not in cache:
            cache[self.bias] = adapter_parameters(self.model, self.bias)
        return dict(cache[self.bias])

    # ------------------------------------------------------------------------------------------ training

    def forward(self, batch: dict[str, torch.Tensor], *, last_micro: bool = True) -> torch.Tensor:
        """Mean loss of one micro-batch; ``last_micro`` says whether gradients sync after its backward."""
        return self.model(**batch).loss

    def backward(self, loss: torch.Tensor, *, grad_accum: int, last_micro: bool) -> None:
        """Backpropagate one micro-batch's mean loss; gradients average over the global batch."""
        (loss / grad_accum).backward()

    def step(self, lr: float) -> None:
        """Apply the accumulated gradients with this learning rate and clear them."""
        assert self.optimizer is not None
        self.set_lr(lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------------------------------ checkpoint

    @abstractmethod
    def local_pieces(self) -> list[LocalPiece]:
        """This rank's piece of every adapter tensor, in adapter order (empty pieces included)."""

    @abstractmethod
    def load_full(self, p: nn.Parameter, full: dict[str, torch.Tensor], step: float | None) -> None:
        """Put a full tensor (and its optimizer state, if given) into this rank's shard of parameter ``p``."""

    def finish_load(self) -> None:  # noqa: B027 - optional hook
        """Called once after every tensor was loaded."""

    def prepare_load(self, with_optimizer: bool) -> None:  # noqa: B027 - optional hook
        """Called once before tensors are loaded (engines with lazy optimizer state create it here)."""


# ---------------------------------------------------------------------------------------------- helpers


def torch_optim_fields(
    optimizer: torch.optim.Optimizer | None, p: torch.Tensor
) -> tuple[dict[str, torch.Tensor], float | None]:
    """Adam state of one parameter from a plain torch optimizer (local shard for DTensors), as 1-D fp32."""
    state = optimizer.state.get(p) if optimizer is not None else None
    if not state:
        return {}, None
    out = {}
    for name in OPTIM_TENSOR_FIELDS:
        t = state.get(name)
        if t is not None:
            t = t.to_local() if hasattr(t, "to_local") else t
            out[name] = t.detach().reshape(-1).float()
    step = state.get("step")
    return out, float(step) if step is not None else 0.0


def full_pieces(backend: Backend, owner: bool) -> list[LocalPiece]:
    """Pieces for replicated parameters: the whole tensor on the owner rank, empty pieces elsewhere."""
    pieces = []
    for key, p in backend.adapter().items():
        optim, step = torch_optim_fields(backend.optimizer, p)
        fields = {WEIGHT_FIELD: p.detach().reshape(-1).float(), **optim}
        if not owner:
            fields = {k: v[:0] for k, v in fields.items()}
        pieces.append(LocalPiece(key, full_shape(p), 0, fields, step))
    return pieces


def load_torch_optim_state(
    optimizer: torch.optim.Optimizer,
    p: torch.Tensor,
    full: dict[str, torch.Tensor],
    step: float | None,
    to_param: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Create or overwrite the Adam state of ``p`` from full tensors; ``to_param`` shapes them like ``p``."""
    if not any(k in full for k in OPTIM_TENSOR_FIELDS):
        return
    state = optimizer.state[p]
    state["step"] = torch.tensor(float(step or 0.0), dtype=torch.float32)
    for name in OPTIM_TENSOR_FIELDS:
        if name in full:
            state[name] = to_param(full[name])
