"""The small interface every backend implements: train a step, expose the local adapter shards, load full ones.

The trainer and the gather/scatter code see only this interface. A backend describes, for each adapter tensor,
which contiguous range of the flattened full tensor this rank holds (``LocalPiece``); the gather moves those
pieces to rank 0 in buckets, and on load each backend cuts its own range out of the full tensors it is given.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dist_lora.checkpoint import CheckpointError
from dist_lora.config import ParallelConfig
from dist_lora.constants import WEIGHT_FIELD
from dist_lora.distributed import comm_device
from dist_lora.lora import adapter_parameters, base_key, canonical_name, check_nothing_dropped, full_shape
from dist_lora.model import (
    build_on_meta,
    compute_device,
    fill_from_files,
    host_tensors,
    load_base,
    release_freed_memory,
)
from dist_lora.quantize import fill_shard, is_nf4
from dist_lora.weights import BaseWeights


@dataclass
class LocalPiece:
    """What this rank holds of one adapter tensor: elements [offset, offset + numel) of the flattened tensor."""

    key: str
    shape: torch.Size
    offset: int
    fields: dict[str, torch.Tensor]
    """1-D fp32 tensors of equal length, one per field: "weight" and the optimizer's element-wise state ("exp_avg",
    "exp_avg_sq", ...)."""
    step: float | None = None
    """The optimizer's step count for this tensor, or None when it holds no state yet."""

    @property
    def numel(self) -> int:
        return next(iter(self.fields.values())).numel() if self.fields else 0


class Staging:
    """A reusable CPU buffer that copies many tensors in one operation (pinned when they live on a GPU).

    An asynchronous save copies this rank's adapter shard and Adam state here, then gathers from the copy in the
    background. The buffer is reused, so a copy is valid until the next one: the checkpointer copies again only
    after the previous save has finished reading (and it never pays for a fresh pinned allocation per save).
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._ready: Any = None  # a CUDA event on the training stream, recorded by mark()
        self._stream: Any = None

    def mark(self) -> None:
        """Record where the training stream is (on a GPU), so that a copy made from another thread sees it."""
        self._ready = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._ready = torch.cuda.Event()
            self._ready.record()

    def copy(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """fp32 1-D copies of ``tensors``, in order (views into the buffer)."""
        if not tensors:
            return []
        sizes = [t.numel() for t in tensors]
        total = sum(sizes)
        on_gpu = any(t.is_cuda for t in tensors)
        buffer = self._buffer
        if buffer is None or buffer.numel() < total or (on_gpu and not buffer.is_pinned()):
            buffer = self._buffer = torch.empty(total, dtype=torch.float32, pin_memory=on_gpu)
        out = buffer[:total]
        with torch.no_grad():
            flat = [t.detach().reshape(-1) for t in tensors]
            if on_gpu:  # on a side stream after the marked point: one kernel, one copy into pinned memory
                device = next(t.device for t in flat if t.is_cuda)  # this thread's current device may differ
                if self._stream is None or self._stream.device != device:
                    self._stream = torch.cuda.Stream(device=device)
                with torch.cuda.device(device), torch.cuda.stream(self._stream):
                    if self._ready is not None:
                        self._stream.wait_event(self._ready)
                    out.copy_(torch.cat([t.to(torch.float32) for t in flat]), non_blocking=True)
                self._stream.synchronize()
            else:
                torch.cat(flat, out=out)
        return list(out.split(sizes))


class Backend(ABC):
    """A wrapped model and its optimizer, seen through what training and checkpointing need."""

    name: str = "base"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, bias: str):
        self.model: Any = model  # the wrapped module: DDP, DeepSpeedEngine, FSDP2 module or plain
        self.optimizer = optimizer
        self.bias = bias

    def describe(self) -> str:
        """The engine and how it lays the model out, for the run's log."""
        return self.name

    # ------------------------------------------------------------------------------------------ registry

    @classmethod
    def load_base(
        cls,
        parallel: ParallelConfig,
        name_or_path: str,
        dtype: torch.dtype,
        device: torch.device,
        *,
        quantized: bool = False,
        revision: str | None = None,
        **batch: Any,
    ) -> tuple[nn.Module, BaseWeights | None]:
        """The base model as this backend loads it, and the weights :meth:`wrap` still has to read (None when the
        base is loaded already). By default one whole copy per rank, as a replicated engine needs: from_pretrained
        in ``dtype``, on ``device``; a base to be quantized (``quantized``, from a local directory) is built on the
        meta device instead, so that :meth:`wrap` reads and quantizes it one tensor at a time and the whole base
        never sits in memory in ``dtype``. Sharding engines override it so that no rank holds more than its shard.
        ``revision``: a hub id's commit, branch or tag. ``batch``: the run's ``micro_batch_size``, ``grad_accum``
        and ``max_grad_norm``, for an engine configured before the model is built (ZeRO-3)."""
        weights = BaseWeights.of(name_or_path) if quantized else None
        if weights is not None:
            model = build_on_meta(name_or_path, dtype)
            whole = lambda shape: ([(0, math.prod(shape))], False)  # noqa: E731 - read whole, then quantized
            weights.follow(model).read_ahead(whole, None)
            return model, weights
        return load_base(name_or_path, dtype, revision=revision).to(device), None

    @classmethod
    def shards(cls, parallel: ParallelConfig) -> int:
        """How many ranks share each base weight (1: every rank holds it whole)."""
        return 1

    @classmethod
    def gathers_parameters(cls, parallel: ParallelConfig) -> bool:
        """Whether the engine all-gathers parameters for its forward and backward (FSDP2, ZeRO-3): buffers of a
        block's size come and go every step."""
        return False

    @classmethod
    def wrap(
        cls,
        parallel: ParallelConfig,
        model: nn.Module,
        make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        bias: str,
        *,
        micro_batch_size: int,
        grad_accum: int,
        weights: BaseWeights | None = None,
        max_grad_norm: float | None = None,
    ) -> Backend:
        """Wrap a LoRA model as ``parallel`` says and create its optimizer over the trainable parameters;
        ``weights``: the base's files, for a model :meth:`load_base` built on the meta device; ``max_grad_norm``:
        for engines that clip inside their own step (DeepSpeed), the others clip in :meth:`step`."""
        raise NotImplementedError

    @classmethod
    def recognise(cls, model: nn.Module, optimizer: Any, bias: str) -> Backend | None:
        """A view of a model that this engine already wrapped (with its optimizer), or None if it did not."""
        raise NotImplementedError

    def release(self) -> None:  # noqa: B027 - optional hook
        """Let the engine go now rather than when this backend is dropped (it no longer trains): for engines whose
        library would keep them for the life of the process otherwise (DeepSpeed). Nothing to do for the others."""

    def ready(self) -> None:  # noqa: B027 - optional hook
        """Collective: called on every rank once the engine is built, before training (by :func:`build` after
        :meth:`wrap`, and by the HF callback for an engine the Trainer built)."""

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
        return comm_device()

    def adapter(self) -> dict[str, nn.Parameter]:
        """The adapter's parameters by canonical key (found once per bias mode: a wrapped model keeps them)."""
        cache = self.__dict__.setdefault("_adapter_cache", {})
        if self.bias not in cache:
            cache[self.bias] = self._find_adapter()
        return dict(cache[self.bias])

    def _find_adapter(self) -> dict[str, nn.Parameter]:
        """The adapter's parameters as the model holds them now (:meth:`adapter` keeps them)."""
        return check_nothing_dropped(self.model, adapter_parameters(self.model, self.bias), self.bias)

    # ------------------------------------------------------------------------------------------ training

    def forward(self, batch: dict[str, Any], *, last_micro: bool = True) -> torch.Tensor:
        """The loss of one micro-batch: the mean over its target tokens, or, with ``num_items_in_batch`` in the
        batch (the trainer's), their sum divided by it. ``last_micro``: whether gradients sync after its backward."""
        return self.model(**batch).loss

    def outputs(self, batch: dict[str, Any]) -> Any:
        """The model's outputs (its loss and logits) for one micro-batch outside training: evaluation."""
        return self.model(**batch)

    def backward(self, loss: torch.Tensor, *, grad_accum: int, last_micro: bool) -> None:
        """Backpropagate one micro-batch's mean loss; gradients average over the global batch."""
        (loss / grad_accum).backward()

    def step(self, lr: float, max_grad_norm: float | None = None) -> float:
        """Apply the accumulated gradients with this learning rate and clear them. Returns the global L2 norm of
        the gradients over every trainable tensor on every rank (collective where they are sharded), after
        scaling them to ``max_grad_norm`` if it is exceeded, as ``torch.nn.utils.clip_grad_norm_`` does."""
        assert self.optimizer is not None
        self.set_lr(lr)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor, already reduced
        return float(full)

    def local_grads(self) -> dict[str, torch.Tensor] | None:
        """The adapter's gradients as this rank holds them, by key (a DTensor's local shard), after backward and
        before :meth:`step`; None for an engine that keeps them in its own buffers (DeepSpeed)."""
        out = {}
        for key, p in self.adapter().items():
            if p.grad is not None:
                out[key] = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        return out

    def lr_groups(self) -> list[dict[str, Any]]:
        """The parameter groups whose learning rates :meth:`set_lr` sets (DeepSpeed: its ZeRO optimizer's)."""
        assert self.optimizer is not None
        return list(self.optimizer.param_groups)

    def set_lr(self, lr: float) -> None:
        """Every parameter group's learning rate from the schedule's ``lr``, times the group's ``lr_scale`` (LoRA+)."""
        for group in self.lr_groups():
            group["lr"] = lr * group.get("lr_scale", 1.0)

    # ------------------------------------------------------------------------------------------ checkpoint

    def stepping_optimizer(self) -> Any:
        """The optimizer that steps the adapter and whose state a save holds (DeepSpeed: the one inside ZeRO's)."""
        return self.optimizer

    def check_optimizer_state(self) -> None:
        """Not a collective: raise :class:`CheckpointError` naming the state a save could not hold (see
        :func:`elementwise_state`), as soon as the optimizer has some, rather than at the first save."""
        optimizer = self.stepping_optimizer()
        for like, state in optimizer.state.items() if optimizer is not None else ():
            elementwise_state(optimizer, state, like)

    def senders(self) -> int | None:
        """How many ranks, 0..k-1, hold the pieces a save gathers (None: every rank may). The others send
        nothing (HSDP: one replica group's ranks)."""
        return None

    @abstractmethod
    def local_pieces(self) -> list[LocalPiece]:
        """This rank's piece of every adapter tensor, in adapter order (empty pieces included)."""

    def snapshot(self, staging: Staging) -> list[LocalPiece]:
        """This rank's pieces, copied into ``staging``: a copy later optimizer steps cannot change.

        Not a collective. An asynchronous save calls it on its background thread while training runs the next
        forward and backward (the checkpointer holds the next optimizer step back until it returns). Backends
        whose state lives in a few flat tensors override it to copy those wholesale.
        """
        pieces = self.local_pieces()
        copies = iter(staging.copy([t for p in pieces for t in p.fields.values()]))
        return [LocalPiece(p.key, p.shape, p.offset, {n: next(copies) for n in p.fields}, p.step) for p in pieces]

    @abstractmethod
    def load_full(self, p: nn.Parameter, full: dict[str, torch.Tensor], step: float | None) -> None:
        """Put a full tensor (and its optimizer state, if given) into this rank's shard of parameter ``p``."""

    def finish_load(self) -> None:  # noqa: B027 - optional hook
        """Called once after every tensor was loaded."""

    def prepare_load(self, fields: list[str]) -> None:  # noqa: B027 - optional hook
        """Called once before tensors are loaded, with the optimizer state fields to be loaded (none without an
        optimizer): engines with lazy optimizer state create those fields here, and engines that may hold gathered
        copies of the parameters (FSDP2) drop them."""


# ---------------------------------------------------------------------------------------------- helpers


def from_files(model: nn.Module, weights: BaseWeights) -> dict[str, torch.Tensor]:
    """Before a model built on the meta device is wrapped: the adapter tensors PEFT derives from the base, computed
    from the files (DoRA magnitudes, trainable token rows), then copies of everything not on meta (the adapter,
    computed buffers) that :func:`materialize` puts back."""
    fill_from_files(model, weights)
    return host_tensors(model)


def materialize(
    model: nn.Module,
    weights: BaseWeights,
    host: dict[str, torch.Tensor],
    *,
    row_offset: Callable[[Any], int] = lambda p: 0,
    group: Callable[[Any], Any] = lambda p: None,
    sliced: Callable[[Any], list[tuple[int, int]] | None] = lambda p: None,
    offloaded: Collection[torch.Tensor] = (),
) -> None:
    """A model on the meta device (sharded or not) gets its memory and values, one tensor at a time: each rank
    allocates only what it holds of every parameter (a DTensor's local rows from ``row_offset``) and reads exactly
    those rows from the base's safetensors files; an NF4 weight quantizes its rows into place (collective over
    ``group(p)``, the ranks sharding it); the adapter and the computed buffers, which the files do not hold, come
    from ``host`` (their values before wrapping). A parameter that a rank holds as several ranges of its flattened
    values (``sliced(p)``: FSDP2's slice of every expert of a MoE layer) has each range read in turn.

    On the CPU, a frozen parameter of the files' dtype is not read at all: its rows become a view of the file's
    pages (:meth:`BaseWeights.mapped`), which takes the meta parameter's place in the same pass that gives every
    other tensor its memory (one ``Module._apply``, as ``to_empty`` makes it; FSDP2 then takes the view as the local
    shard). That is how ``from_pretrained`` leaves a CPU model, and costs as little: nothing is allocated for it.
    The same holds on a GPU for the ``offloaded`` parameters, whose shards live in host memory (FSDP2's CPU
    offload; it copies them into pinned memory itself); the buffers and the other parameters go to the GPU."""
    device = compute_device()
    on_host = {id(p) for p in offloaded} if device.type != "cpu" else {id(p) for p in model.parameters()}
    with torch.no_grad():
        views = _views(model, weights, host, row_offset, sliced, on_host)

        def place(t: torch.Tensor) -> torch.Tensor:  # (a parameter keeps its identity through _apply)
            if id(t) in views:  # a tied parameter is met once per name: the same view each time, so they stay tied
                return views[id(t)]
            return torch.empty_like(t, device="cpu" if id(t) in on_host else device)

        model._apply(place)
        for name, p in model.named_parameters():
            if id(p) in views:
                continue
            key = canonical_name(name)
            ranges = sliced(p)
            if ranges is not None:  # the ranges one after another, each straight into its place in the shard
                flat, at = (p.to_local() if isinstance(p, DTensor) else p).view(-1), 0
                for first, last in ranges:
                    weights.flat(base_key(key), first, last, out=flat[at : at + last - first])
                    at += last - first
                continue
            local, start, stop = _shard(p, row_offset)
            if is_nf4(local):  # QLoRA: this rank's rows, quantized as the whole weight would be
                fill_shard(local, weights.rows(base_key(key), start, stop), group(p))
            elif key in host:
                local.copy_((host[key].reshape(p.shape)[start:stop] if p.dim() else host[key]).reshape(local.shape))
            else:
                weights.rows(base_key(key), start, stop, out=local)  # the file's bytes straight into the shard
        for name, b in model.named_buffers():
            key = canonical_name(name)
            b.copy_(host[key] if key in host else weights.rows(base_key(key), 0, b.shape[0] if b.dim() else 1))
    weights.drop_unused_maps()
    release_freed_memory()


def _views(
    model: nn.Module,
    weights: BaseWeights,
    host: dict[str, torch.Tensor],
    row_offset: Callable[[Any], int],
    sliced: Callable[[Any], list[tuple[int, int]] | None],
    on_host: set[int],
) -> dict[int, torch.Tensor]:
    """Views of the files for the parameters of a model on the meta device that live in host memory (ids in
    ``on_host``) and can have one, by the id of the parameter: frozen, not scalars, not NF4, not from ``host``, not
    the front of FSDP2's padded buffer, and held by the files in their dtype where a tensor of it may start."""
    views = {}
    for name, p in model.named_parameters():
        key = canonical_name(name)
        if id(p) not in on_host or sliced(p) is not None:  # on the GPU; or several ranges of the files: read
            continue
        local, start, stop = _shard(p, row_offset)
        if p.requires_grad or not local.dim() or is_nf4(local) or key in host or _in_padded_buffer(local):
            continue  # a trained tensor (bias="all") gets memory of its own
        view = weights.mapped(base_key(key), start, stop, local.dtype)
        if view is not None:
            views[id(p)] = _like(p, view)
    return views


def _shard(p: torch.Tensor, row_offset: Callable[[Any], int]) -> tuple[torch.Tensor, int, int]:
    """What this rank holds of parameter ``p``: its local tensor and the rows ``[start, stop)`` of dim 0 that it
    is (a scalar is one row)."""
    local = p.to_local() if hasattr(p, "to_local") else p
    start = row_offset(p)
    return local, start, start + (local.shape[0] if local.dim() else 1)


def _in_padded_buffer(local: torch.Tensor) -> bool:
    """Whether a shard is the front of a larger allocation: FSDP2's last rank keeps its uneven shard padded, and
    would copy a view of the files into that padding, so its rows are read straight into the buffer instead."""
    return local.untyped_storage().nbytes() > local.numel() * local.element_size()


def _like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` as ``p`` is: a DTensor of ``p``'s mesh, placements and global shape when ``p`` is one."""
    if isinstance(p, DTensor):
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    return local


def elementwise_state(optimizer: Any, state: dict[str, Any], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The element-wise tensors of one parameter's optimizer state, by name: every tensor with one value per element
    of the parameter (``like``: the parameter, or the flat partition DeepSpeed steps), such as Adam's ``exp_avg``
    and ``exp_avg_sq``, AMSGrad's ``max_exp_avg_sq``, SGD's ``momentum_buffer`` or Adagrad's ``sum``. They shard,
    gather and reshard as the parameter does. Anything else but the step count (factored or quantized moments,
    per-tensor scalars) cannot be cut into shards: it is refused, naming it, rather than saved without it."""
    out, other = {}, []
    for name, value in state.items():
        if name == "step" or value is None:
            continue
        if isinstance(value, torch.Tensor) and value.dim() and value.shape == like.shape:
            if "." in name or name == WEIGHT_FIELD:
                other.append(f"{name} (a name a checkpoint key cannot hold)")
            else:
                out[name] = value
        else:
            what = f"shape {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            other.append(f"{name} ({what})")
    if other:
        raise CheckpointError(
            f"the optimizer's state cannot be saved: {type(optimizer).__name__} holds {', '.join(other)} besides "
            f"tensors of the parameter's shape {list(like.shape)}; dist_lora saves element-wise state (AdamW and "
            "Adam with or without amsgrad, SGD with momentum, Adagrad, RMSprop, Lion, ...) and the step count, "
            "which reshard to any world size. Use such an optimizer, or save and load without one (optimizer=None) "
            "and start its state afresh on resume"
        )
    return out


def expected_state_fields(optimizer: Any) -> set[str] | None:
    """The element-wise state fields ``optimizer`` keeps, where that is known before a load: those it holds after
    its first step, or torch Adam's and AdamW's own (``max_exp_avg_sq`` too under AMSGrad); None otherwise."""
    for state in optimizer.state.values():
        if state:
            return {k for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor) and v.dim()}
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        amsgrad = any(group.get("amsgrad") for group in optimizer.param_groups)
        return {"exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if amsgrad else [])}
    return None


def torch_optim_fields(
    optimizer: torch.optim.Optimizer | None, p: torch.Tensor
) -> tuple[dict[str, torch.Tensor], float | None]:
    """The element-wise state of one parameter from a plain torch optimizer (local shard for DTensors), as 1-D fp32,
    and its step count (0 for an optimizer that counts none); ``({}, None)`` before its first step."""
    state = optimizer.state.get(p) if optimizer is not None else None
    if not state:
        return {}, None
    out = {}
    with torch.no_grad():  # DTensor.to_local outside autograd is a cheap attribute read
        for name, t in elementwise_state(optimizer, state, p).items():
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
    """Create or overwrite the optimizer state of ``p`` from full tensors (every field of ``full`` but the weight,
    as saved); ``to_param`` shapes them like ``p``."""
    names = [name for name in full if name != WEIGHT_FIELD]
    if not names:
        return
    state = optimizer.state[p]
    state["step"] = torch.tensor(float(step or 0.0), dtype=torch.float32)
    for name in names:
        state[name] = to_param(full[name])
