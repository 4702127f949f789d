"""FSDP2 (``fully_shard``): every parameter is a DTensor sharded on dim 0 across the ranks.

Rank r holds rows [r*c, min((r+1)*c, dim0)) of each tensor, c = ceil(dim0 / world) (torch.chunk), so its piece
of the flattened tensor is one contiguous range. Adam's moments are DTensors with the same placement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from dist_lora.backends.base import (
    Backend,
    LocalPiece,
    Staging,
    from_files,
    load_torch_optim_state,
    materialize,
    torch_optim_fields,
)
from dist_lora.config import ConfigError
from dist_lora.constants import ENV_LOCAL_WORLD_SIZE, WEIGHT_FIELD
from dist_lora.model import build_on_meta, transformer_blocks
from dist_lora.quantize import is_nf4
from dist_lora.weights import BaseWeights


def replica_groups(replicate: int | str, world: int, per_node: int) -> int:
    """``parallel.replicate`` as a number of replica groups of ``world`` ranks ("nodes": one per node of
    ``per_node`` ranks)."""
    return world // per_node if replicate == "nodes" else int(replicate)


def check_replica_groups(replicas: int, world: int) -> None:
    """HSDP's replica groups must split the world evenly."""
    if world % replicas:
        raise ConfigError(
            f"parallel.replicate={replicas} does not divide the world size {world}: use a divisor of it, "
            "typically the number of nodes (each replica group should be the ranks of one node)"
        )


def _replicas(replicate: int | str) -> int:
    """``parallel.replicate`` as a number of replica groups in this job ("nodes": one per node)."""
    import os

    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    return replica_groups(replicate, world, int(os.environ.get(ENV_LOCAL_WORLD_SIZE, world)))


def device_mesh(replicate: int | str) -> Any:
    """The one device mesh every ``fully_shard`` of a model shares (left to itself, each call builds its own: one
    per block). 1-D over the world; with ``replicate`` > 1 (HSDP), 2-D: ``replicate`` groups (outer dim) of
    world / replicate ranks that shard (inner dim); "nodes": one group per node (the ranks of a node are
    consecutive, as torchrun and the deepspeed launcher number them)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    replicate = _replicas(replicate)
    check_replica_groups(replicate, world)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if replicate == 1:
        return init_device_mesh(device, (world,))
    return init_device_mesh(device, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def model_mesh(model: nn.Module) -> Any:
    """The device mesh of an FSDP2 model's shards (its first DTensor's); None for a model without DTensors."""
    return next((p.device_mesh for p in model.parameters() if isinstance(p, DTensor)), None)


def mark_sharded(model: Any) -> None:
    """Mark a PEFT model whose base FSDP2 has sharded (``load_sharded``'s, or one you ``fully_shard``-ed yourself)
    as transformers marks one that ``from_pretrained(distributed_config=...)`` sharded as it loaded, so that HF's
    ``Trainer`` takes it as it is. Call it after ``fully_shard`` and before ``Trainer(...)``, which reads the mark
    as it is built. Without the mark, accelerate wraps the DTensor parameters in DDP, which fails at its first
    broadcast ("c10d.broadcast_.default does not have a sharding strategy"). With it, the Trainer neither wraps
    nor shards the model again, and defers the gradient reduction of all but an accumulation window's last
    micro-batch with FSDP2's own switches (under HSDP only the all-reduce across replica groups, by
    ``dp_replicate_size``). Nothing is serialized: transformers leaves ``distributed_config`` out of a saved
    ``config.json``."""
    from transformers.distributed.configuration_utils import DistributedConfig

    mesh = model_mesh(model)
    if mesh is None:
        raise ValueError(
            f"mark_sharded: {type(model).__name__} holds no FSDP2 shards (DTensor parameters): call it after "
            "fully_shard (on each block, then on the model), for a model HF's Trainer should take as it is"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's, or PEFT injected
    if not hasattr(base, "_is_distributed_loading_by_transformers"):
        raise ValueError(
            f"mark_sharded: {type(base).__name__} is not a transformers PreTrainedModel (nor a PeftModel of one): "
            "HF's Trainer reads its mark on those only"
        )
    replicas, shards = (mesh.size(0), mesh.size(1)) if mesh.ndim == 2 else (1, mesh.size())
    base._is_distributed_loading_by_transformers = True
    base.config.distributed_config = DistributedConfig(fsdp_size=shards, dp_replicate_size=replicas)


def _chunk(rows: int, shard: int, shards: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of dim 0 that shard ``shard`` of ``shards`` holds, as FSDP2 splits a tensor
    (torch.chunk): ``[shard * c, (shard + 1) * c)``, ``c = ceil(rows / shards)``, clipped to the tensor."""
    chunk = math.ceil(rows / shards)
    return min(shard * chunk, rows), min((shard + 1) * chunk, rows)


def shard_dim(shape: tuple[int, ...], shards: int) -> int:
    """The dim FSDP2 shards a frozen base tensor on: 0 (rows), but 1 for a MoE layer's fused experts (3-D: experts,
    then each expert's rows) with fewer experts than shards and a second dim that splits evenly (FSDP2 splits other
    dims than the first evenly only), as torchtitan does. By rows, the first ranks would hold a whole expert each
    and the others none (Mixtral's 8 experts over 32 ranks); sliced, every rank holds its part of every expert."""
    return 1 if len(shape) == 3 and shape[0] < shards and shape[1] % shards == 0 else 0


def _slices(shape: tuple[int, ...], shard: int, shards: int) -> list[tuple[int, int]]:
    """The flattened elements of a tensor sharded on dim 1 that shard ``shard`` of ``shards`` holds: its
    ``shape[1] / shards`` rows of each index of dim 0, one range each."""
    inner = math.prod(shape[2:])
    size, per = shape[1] // shards * inner, shape[1] * inner
    return [(i * per + shard * size, i * per + (shard + 1) * size) for i in range(shape[0])]


def rows_of(shard: int, shards: int) -> Callable[[tuple[int, ...]], tuple[list[tuple[int, int]], bool]]:
    """A rank's share of every base tensor as FSDP2 will shard it (for :meth:`BaseWeights.read_ahead`): its
    :func:`_chunk` of rows, whole unless the split is uneven and they are the short last ones (FSDP2 pads those,
    so they are read, not mapped); or a slice of each expert (:func:`shard_dim`), read."""

    def share(shape: tuple[int, ...]) -> tuple[list[tuple[int, int]], bool]:
        if shard_dim(shape, shards):
            return _slices(shape, shard, shards), False
        rows = shape[0] if shape else 1
        start, stop = _chunk(rows, shard, shards)
        row = math.prod(shape[1:])
        return [(start * row, stop * row)], bool(shape) and stop - start == math.ceil(rows / shards)

    return share


def _shard_group(p: DTensor) -> Any:
    """The ranks that shard ``p`` (under HSDP, its replica group's)."""
    return p.device_mesh.get_group(next(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard)))


def _check_host_collectives() -> None:
    """FSDP2's CPU offload reduces the gradient norm over shards in host memory: on a GPU, the process group must
    hold a gloo backend beside NCCL (dist_lora's trainer makes it so; a loop of one's own makes the group)."""
    import torch.distributed as dist

    backend = str(dist.get_backend())
    if torch.cuda.is_available() and "gloo" not in backend:
        raise ConfigError(
            f"parallel.cpu_offload keeps the shards in host memory, and the process group ({backend}) cannot reduce "
            'host tensors: start it with torch.distributed.init_process_group("cuda:nccl,cpu:gloo")'
        )


def _embedding_groups(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the output projection (``lm_head``), each to be an FSDP group of its own, as
    torchtitan and torchtune's ``custom_sharded_layers`` shard them; [] where they share a parameter (tied, as
    GPT-2's), which must stay in one group, the root's. Left in the root's group, they would stay gathered for the
    whole step: FSDP2 does not reshard the root after forward, and reshards it after backward. Apart, the embedding
    is gathered for its own forward alone (frozen, its output needs no gradient: no backward to gather it for) and
    the projection from its forward to its backward, the first to run; a 70B Llama 3's pair is 4.2 GB in bf16
    that every rank no longer holds while its blocks compute."""
    from dist_lora.lora import unwrap

    hf = unwrap(model)
    first, last = (getattr(hf, f"get_{end}_embeddings", lambda: None)() for end in ("input", "output"))
    if not isinstance(first, nn.Module) or not isinstance(last, nn.Module):
        return []
    tied = {id(p) for p in first.parameters()} & {id(p) for p in last.parameters()}
    return [] if tied else [first, last]


def _shard_trained_apart(model: nn.Module, blocks: list[nn.Module], kwargs: dict[str, Any]) -> list[nn.Module]:
    """For ``keep_base_gathered``: the modules that hold trained parameters (the adapter's, trained biases,
    modules_to_save) become FSDP groups of their own, one per block and one for the rest, before the blocks do, so
    that a block's own group holds only its frozen base. Returns one module of each trained group (each is resharded
    after the step: the optimizer changes its shards)."""
    from torch.distributed.fsdp import fully_shard

    def trains(module: nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters(recurse=False))

    in_blocks = {m for block in blocks for m in block.modules()}
    groups = [[m for m in block.modules() if trains(m)] for block in blocks]
    groups.append([m for m in model.modules() if m not in in_blocks and trains(m)])
    for group in groups:
        if group:
            fully_shard(group, reshard_after_forward=False, **kwargs)  # held across micro-batches (see held)
    return [group[0] for group in groups if group]


class FSDPBackend(Backend):
    name = "fsdp"

    held: tuple[Any, ...] = ()  # FSDPModules
    """FSDP groups kept gathered from one micro-batch's backward to the next one's forward and resharded after the
    step's last: one all-gather per group and step instead of per micro-batch. Every group where blocks are not
    resharded after forward (``reshard_after_forward: false``), whose peak already holds every block gathered at
    once, so holding them a little longer costs no memory at the peak; the trained groups under
    ``keep_base_gathered``. No optimizer step comes between micro-batches, so the gathered copies stay exact."""

    @classmethod
    def gathers_parameters(cls, parallel):  # type: ignore[no-untyped-def]
        return True

    @classmethod
    def shards(cls, parallel):  # type: ignore[no-untyped-def]
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        replicas = _replicas(parallel.replicate)
        return world // replicas if world % replicas == 0 else world  # (wrap's device_mesh refuses the latter)

    @classmethod
    def load_base(cls, parallel, name_or_path, dtype, device, **batch):  # type: ignore[no-untyped-def]
        """A local base is built on the meta device; :meth:`wrap` shards it and each rank reads its own rows from
        the files (a hub id comes as its snapshot's directory: ``model.base_directory``). A hub model published in
        pickle files only loads whole."""
        weights = BaseWeights.of(name_or_path)
        if weights is None:
            return super().load_base(parallel, name_or_path, dtype, device, **batch)
        shards = cls.shards(parallel)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        on_host = device.type == "cpu" or parallel.cpu_offload  # where the shards live; materialize maps them there
        views = dtype if on_host and not batch.get("quantized") else None
        model = build_on_meta(name_or_path, dtype)
        weights.follow(model).read_ahead(rows_of(rank % shards, shards), views)  # the shard dim is the mesh's last
        return model, weights

    @classmethod
    def wrap(
        cls, parallel, model, make_optimizer, bias, *, micro_batch_size, grad_accum, weights=None, max_grad_norm=None
    ):  # type: ignore[no-untyped-def]
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {"mesh": device_mesh(parallel.replicate)}
        if parallel.mixed_precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if parallel.cpu_offload:
            _check_host_collectives()
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        shards = cls.shards(parallel)
        kwargs["shard_placement_fn"] = lambda p: (
            Shard(1) if not p.requires_grad and shard_dim(tuple(p.shape), shards) else None  # None: rows
        )
        host = from_files(model, weights) if weights is not None else {}
        if shards == 1:  # FSDP2 all-gathers a one-rank shard without NF4's extension: keep them local
            kwargs["ignored_params"] = {p for p in model.parameters() if is_nf4(p)}
        blocks = transformer_blocks(model)
        keep = parallel.keep_base_gathered
        trained = _shard_trained_apart(model, blocks, kwargs) if keep else []
        ends = [] if keep else _embedding_groups(model)  # (kept gathered, the root holds them at no extra cost)
        last = [*blocks[-1:], *ends[1:]]  # their backward runs right after the forward: resharding them is wasted
        for module in [*ends[:1], *blocks, *ends[1:]]:
            hold = keep or parallel.reshard_after_forward is False or any(module is m for m in last)
            fully_shard(module, reshard_after_forward=False if hold else parallel.reshard_after_forward, **kwargs)
        fully_shard(model, **kwargs)
        if keep:  # the frozen base never changes: gathered once, at the first forward, it stays exact for the run
            for module in [*blocks, model]:
                module.set_reshard_after_backward(False, recurse=False)
        elif parallel.prefetch:  # explicit: all-gather the next blocks while this one computes (torchtitan's option)
            n = parallel.prefetch
            for i, module in enumerate(blocks):
                module.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + n])
                module.set_modules_to_backward_prefetch(blocks[max(0, i - n) : i][::-1])
        if weights is not None:
            materialize(
                model,
                weights,
                host,
                row_offset=lambda p: cls._row_offset(p) if isinstance(p, DTensor) else 0,
                sliced=cls._sliced,
                group=lambda p: _shard_group(p) if isinstance(p, DTensor) else None,
                offloaded=[p for p in model.parameters() if isinstance(p, DTensor)] if parallel.cpu_offload else (),
            )
        params = [p for p in model.parameters() if p.requires_grad]
        backend = cls(model, make_optimizer(params), bias)
        if keep:
            backend.held = tuple(trained)
        elif parallel.reshard_after_forward is False:
            backend.held = (*ends, *blocks, model)
        return backend

    @classmethod
    def recognise(cls, model, optimizer, bias):  # type: ignore[no-untyped-def]
        return cls(model, optimizer, bias) if any(isinstance(p, DTensor) for p in model.parameters()) else None

    def describe(self) -> str:
        mesh = model_mesh(self.model)
        if mesh is None or mesh.ndim == 1:
            return self.name
        return f"{self.name} (HSDP: {mesh.size(0)} replica groups, each tensor sharded over {mesh.size(1)} rank(s))"

    def forward(self, batch: dict[str, Any], *, last_micro: bool = True) -> torch.Tensor:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last_micro)
            for group in self.held:
                group.set_reshard_after_backward(last_micro, recurse=False)
        return self.model(**batch).loss

    @staticmethod
    def _row_offset(p: DTensor) -> int:
        """The first row of dim 0 this rank holds: sharded on one mesh dim (torch.chunk), replicated on the others."""
        start = 0
        for dim, placement in enumerate(p.placements):
            if isinstance(placement, Shard) and placement.dim == 0:
                start = _chunk(p.shape[0], p.device_mesh.get_local_rank(dim), p.device_mesh.size(dim))[0]
            elif not isinstance(placement, Replicate):
                raise NotImplementedError(
                    f"dist_lora handles FSDP2 params sharded on dim 0 and replicated otherwise, got {p.placements}"
                )
        return start

    @staticmethod
    def _sliced(p: Any) -> list[tuple[int, int]] | None:
        """The flattened elements this rank holds of a base tensor sharded on dim 1 (:func:`shard_dim`), one range
        per expert; None for any other."""
        if isinstance(p, DTensor):
            for dim, placement in enumerate(p.placements):
                if isinstance(placement, Shard) and placement.dim == 1:
                    mesh = p.device_mesh
                    return _slices(tuple(p.shape), mesh.get_local_rank(dim), mesh.size(dim))
        return None

    @staticmethod
    def _owns(p: DTensor) -> bool:
        """Whether this rank's copy of its shard is the one saved: the first replica group's (HSDP)."""
        return all(
            p.device_mesh.get_local_rank(dim) == 0
            for dim, placement in enumerate(p.placements)
            if isinstance(placement, Replicate)
        )

    def senders(self) -> int | None:
        """How many ranks (0..k-1) hold what a save gathers: one replica group's under HSDP (its ranks come first
        in the mesh), every rank otherwise (None)."""
        for p in self.adapter().values():
            if isinstance(p, DTensor) and p.device_mesh.ndim > 1:
                return int(p.device_mesh.size(p.device_mesh.ndim - 1))
        return None

    def _offset(self, key: str, p: Any) -> int:
        """Where this rank's rows start in the flattened tensor (fixed once sharded, so computed once)."""
        if not isinstance(p, DTensor):  # a parameter left unsharded: replicated, rank 0 owns it
            return 0
        offsets = self.__dict__.setdefault("_offsets", {})
        if key not in offsets:
            offsets[key] = self._row_offset(p) * math.prod(p.shape[1:])
        return int(offsets[key])

    def _sources(self) -> list[tuple[str, Any, dict[str, torch.Tensor], float | None]]:
        """(key, parameter, this rank's tensors by field, the optimizer's step or None) for every adapter tensor."""
        out = []
        with torch.no_grad():  # to_local outside autograd is a cheap attribute read
            for key, p in self.adapter().items():
                fields = {WEIGHT_FIELD: p.to_local() if isinstance(p, DTensor) else p.detach()}
                optim, step = torch_optim_fields(self.optimizer, p)
                fields.update(optim)
                if (self.rank != 0) if not isinstance(p, DTensor) else not self._owns(p):  # another copy is saved
                    fields = {name: t.reshape(-1)[:0] for name, t in fields.items()}
                out.append((key, p, fields, step))
        return out

    def local_pieces(self) -> list[LocalPiece]:
        return [
            LocalPiece(key, p.shape, self._offset(key, p), {n: t.reshape(-1).float() for n, t in f.items()}, step)
            for key, p, f, step in self._sources()
        ]

    def snapshot(self, staging: Staging) -> list[LocalPiece]:
        sources = self._sources()
        copies = iter(staging.copy([t for _, _, fields, _ in sources for t in fields.values()]))
        return [
            LocalPiece(key, p.shape, self._offset(key, p), {n: next(copies) for n in fields}, step)
            for key, p, fields, step in sources
        ]

    def _find_adapter(self) -> dict[str, nn.Parameter]:
        # (on the training thread: a save's prepare finds it) a gathered group's module holds its gathered copy in
        # the shards' place, which the next backward frees: a save after an evaluation found the last block's
        # adapter so, and its snapshot read freed memory in the background (a segfault under load)
        self._drop_gathered_copies()
        return super()._find_adapter()

    def prepare_load(self, fields: list[str]) -> None:
        """The next forward gathers what is loaded into the shards (:meth:`_drop_gathered_copies`)."""
        self._drop_gathered_copies()

    def _drop_gathered_copies(self) -> None:
        """Reshard every group, so that each module holds its shards again. A forward without a backward (an
        evaluation) leaves some groups gathered: those that skip resharding after the forward (the root, the last
        block, ``lm_head``, ``reshard_after_forward: false``, the trained groups of ``keep_base_gathered``) reshard
        only after a backward, and until then their modules hold the gathered copies (plain tensors, not DTensors),
        which the next forward would reuse."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def load_full(self, p: Any, full: dict[str, torch.Tensor], step: float | None) -> None:
        def shard(t: torch.Tensor) -> torch.Tensor:
            t = t.to(p.device if not isinstance(p, DTensor) else p.to_local().device, p.dtype)
            if isinstance(p, DTensor):  # every rank has the full tensor: cut locally, no communication
                return distribute_tensor(t.view(p.shape), p.device_mesh, p.placements, src_data_rank=None)
            return t.view_as(p).clone()

        with torch.no_grad():
            value: Any = shard(full[WEIGHT_FIELD])
            if isinstance(p, DTensor):
                p.to_local().copy_(value.to_local())
            else:
                p.copy_(value)
        if self.optimizer is not None:
            load_torch_optim_state(self.optimizer, p, full, step, shard)
