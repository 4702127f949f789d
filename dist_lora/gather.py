"""Shards <-> one full adapter on rank 0, in bucketed collectives.

Save (:func:`gather_adapter`): every rank packs its pieces of a bucket of adapter tensors (weights and Adam
moments) into one flat buffer, and one ``gather`` per bucket brings them to rank 0, which writes them into the
full tensors. Two small collectives per save agree on bucket sizes and piece offsets. Only adapter tensors move;
rank 0 holds the full adapter plus one bucket per rank, other ranks hold one bucket.

Load (:func:`broadcast_adapter`): rank 0 holds a verified step; one ``broadcast`` per bucket sends the full
tensors, and each rank's backend keeps its own range.

Every collective goes through :func:`_record`, so a test can see exactly which bytes moved.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dist_lora.backends.base import Backend, LocalPiece
from dist_lora.checkpoint import AdapterState
from dist_lora.constants import OPTIM_TENSOR_FIELDS, WEIGHT_FIELD

DEFAULT_BUCKET_BYTES = 32 * 2**20


class CommStats:
    """Bytes this rank put into collectives, by operation (reset with :meth:`clear`)."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def clear(self) -> None:
        self.bytes.clear()
        self.calls.clear()


COMM_STATS = CommStats()


def _record(op: str, t: torch.Tensor) -> None:
    COMM_STATS.bytes[op] += t.numel() * t.element_size()
    COMM_STATS.calls[op] += 1


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def buckets_by_size(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Split indices into consecutive buckets of at most ``bucket_bytes`` (a larger item gets its own)."""
    buckets: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if current and total + size > bucket_bytes:
            buckets.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        buckets.append(current)
    return buckets


# ---------------------------------------------------------------------------------------------- save


def _field_names(pieces: list[LocalPiece], with_state: bool) -> list[str]:
    return [WEIGHT_FIELD, *OPTIM_TENSOR_FIELDS] if with_state else [WEIGHT_FIELD]


def _piece_field(piece: LocalPiece, name: str) -> torch.Tensor:
    t = piece.fields.get(name)
    return t if t is not None else torch.zeros(piece.numel)  # Adam state not created yet == zeros


def gather_adapter(backend: Backend, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> AdapterState | None:
    """Collective: every rank must call. Returns the full adapter (and its Adam state) on rank 0, None elsewhere.

    Moves only adapter bytes: one ``gather`` per bucket, plus one tiny ``all_reduce`` and one tiny ``gather`` of
    piece offsets. Rank 0's extra memory is the adapter plus one bucket per rank; other ranks', one bucket.
    """
    rank, world = _dist()
    pieces = backend.local_pieces()
    has_state = any(p.step is not None for p in pieces)
    device = backend.device
    n = len(pieces)

    full_bytes = [math.prod(p.shape) * 4 for p in pieces]
    buckets = buckets_by_size(full_bytes, bucket_bytes)

    if world > 1:
        # Agree on: whether any rank has optimizer state, the piece count, and each bucket's padded size.
        contrib = [sum(pieces[i].numel for i in b) if rank != 0 else 0 for b in buckets]
        agree = torch.tensor([int(has_state), n, -n, *contrib], dtype=torch.int64, device=device)
        _record("all_reduce", agree)
        dist.all_reduce(agree, op=dist.ReduceOp.MAX)
        has_state, n_max, n_min = bool(agree[0]), int(agree[1]), -int(agree[2])
        if n_max != n or n_min != n:
            raise RuntimeError(f"ranks disagree on the adapter: {n} tensors here, {n_min}..{n_max} elsewhere")
        padded = [int(x) for x in agree[3:]]
    fields = _field_names(pieces, has_state)
    nf = len(fields)

    # Rank 0 allocates the full result and fills in its own pieces without any communication.
    weights: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    if rank == 0:
        for p in pieces:
            weights[p.key] = torch.empty(math.prod(p.shape), dtype=torch.float32)
            if has_state:
                optim[p.key] = {f: torch.zeros(math.prod(p.shape), dtype=torch.float32) for f in fields[1:]}
                optim[p.key]["step"] = torch.tensor(p.step if p.step is not None else 0.0, dtype=torch.float32)
        for p in pieces:
            _place(weights, optim, p.key, p.offset, {f: _piece_field(p, f) for f in fields})

    if world > 1:
        meta = torch.tensor([[p.offset, p.numel] for p in pieces], dtype=torch.int64, device=device).reshape(-1, 2)
        all_meta = [torch.empty_like(meta) for _ in range(world)] if rank == 0 else None
        _record("gather", meta)
        dist.gather(meta, all_meta, dst=0)
        for bucket, size in zip(buckets, padded):
            if size == 0:
                continue
            buf = torch.zeros(size * nf, dtype=torch.float32, device=device)
            if rank != 0:
                pos = 0
                for i in bucket:
                    for f in fields:
                        t = _piece_field(pieces[i], f)
                        buf[pos : pos + t.numel()] = t
                        pos += t.numel()
            recv = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
            _record("gather", buf)
            dist.gather(buf, recv, dst=0)
            if rank == 0:
                assert recv is not None and all_meta is not None
                for r in range(1, world):
                    data = recv[r].cpu()
                    pos = 0
                    for i in bucket:
                        offset, numel = (int(x) for x in all_meta[r][i])
                        chunk = {f: data[pos + j * numel : pos + (j + 1) * numel] for j, f in enumerate(fields)}
                        pos += numel * nf
                        _place(weights, optim, pieces[i].key, offset, chunk)
                del recv
    if rank != 0:
        return None
    shapes = {p.key: p.shape for p in pieces}
    weights = {k: t.view(shapes[k]) for k, t in weights.items()}
    optim = {k: {f: (t.view(shapes[k]) if f != "step" else t) for f, t in d.items()} for k, d in optim.items()}
    return AdapterState(weights, optim)


def _place(weights: dict, optim: dict, key: str, offset: int, chunk: dict[str, torch.Tensor]) -> None:
    numel = chunk[WEIGHT_FIELD].numel()
    if numel == 0:
        return
    weights[key][offset : offset + numel] = chunk[WEIGHT_FIELD]
    for f, t in chunk.items():
        if f != WEIGHT_FIELD:
            optim[key][f][offset : offset + numel] = t


# ---------------------------------------------------------------------------------------------- load


def broadcast_json(obj: Any) -> Any:
    """Collective: rank 0's JSON-able object on every rank (two broadcasts; no pickle)."""
    rank, world = _dist()
    if world == 1:
        return obj
    device = _comm_device()
    if rank == 0:
        payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)
        length = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        length = torch.empty(1, dtype=torch.int64, device=device)
    _record("broadcast", length)
    dist.broadcast(length, src=0)
    if rank != 0:
        payload = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    _record("broadcast", payload)
    dist.broadcast(payload, src=0)
    return json.loads(bytes(payload.cpu().numpy().tobytes()).decode())


def _comm_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_adapter(
    backend: Backend,
    state: AdapterState | None,
    header: dict[str, Any],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Collective: rank 0's full adapter (and optimizer state) into every rank's shards.

    ``header`` (the same on every rank, from :func:`broadcast_json`) lists keys, shapes, fields and steps;
    ``state`` is needed on rank 0 only. One ``broadcast`` per bucket; each rank's backend keeps its own range.
    """
    rank, world = _dist()
    keys: list[str] = header["keys"]
    shapes = {k: torch.Size(s) for k, s in header["shapes"].items()}
    fields: list[str] = header["fields"]
    steps: dict[str, float] = header.get("steps", {})
    params = backend.adapter()
    device = backend.device
    sizes = [math.prod(shapes[k]) * 4 * len(fields) for k in keys]
    for bucket in buckets_by_size(sizes, bucket_bytes):
        numels = [math.prod(shapes[keys[i]]) for i in bucket]
        if rank == 0:
            assert state is not None
            parts = []
            for i in bucket:
                k = keys[i]
                for f in fields:
                    src = state.weights[k] if f == WEIGHT_FIELD else state.optim[k][f]
                    parts.append(src.reshape(-1).float())
            buf = torch.cat(parts).to(device)
        else:
            buf = torch.empty(sum(numels) * len(fields), dtype=torch.float32, device=device)
        if world > 1:
            _record("broadcast", buf)
            dist.broadcast(buf, src=0)
        pos = 0
        for i, numel in zip(bucket, numels):
            k = keys[i]
            full = {}
            for f in fields:
                full[f] = buf[pos : pos + numel].view(shapes[k])
                pos += numel
            backend.load_full(params[k], full, steps.get(k))
            if on_tensor is not None:
                on_tensor(k)
