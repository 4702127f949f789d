"""Shards <-> one full adapter on rank 0, in bucketed collectives.

Save (:func:`gather_adapter`): every rank lays its pieces of the adapter tensors (weights and Adam moments) end to
end, and one ``gather`` per bucket-sized chunk of that stream brings them to rank 0, which copies them into the
full tensors. Two small collectives per save agree on sizes and piece offsets. Only adapter tensors move; rank 0
holds the full adapter plus one chunk per rank, other ranks hold one chunk.

Load (:func:`broadcast_adapter`): rank 0 holds a verified step; one ``broadcast`` per bucket sends the full
tensors, and each rank's backend keeps its own range.

Every collective goes through :func:`_record`, so a test can see exactly which bytes moved.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dist_lora.backends.base import Backend, LocalPiece
from dist_lora.checkpoint import AdapterState
from dist_lora.constants import WEIGHT_FIELD
from dist_lora.distributed import comm_device
from dist_lora.faults import failpoint

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


def _piece_field(piece: LocalPiece, name: str) -> torch.Tensor:
    t = piece.fields.get(name)
    return t if t is not None else torch.zeros(piece.numel)  # Adam state not created yet == zeros


class _Stream:
    """A rank's pieces laid end to end (piece by piece, field by field), read or written in consecutive chunks.

    Sender and rank 0 walk the same layout: the sender copies its pieces into each chunk; rank 0 copies each
    received chunk into the full tensors. Neither side ever materializes the whole stream.
    """

    def __init__(self, numels: list[int], n_fields: int):
        self.segments = [(i, j, n) for i, n in enumerate(numels) if n for j in range(n_fields)]
        self.index = 0  # current segment
        self.done = 0  # elements of the current segment already consumed

    def walk(self, length: int):
        """Yield (piece, field, start within the piece's field, start within the chunk, n) covering ``length``."""
        pos = 0
        while pos < length and self.index < len(self.segments):
            i, j, n = self.segments[self.index]
            take = min(n - self.done, length - pos)
            yield i, j, self.done, pos, take
            pos += take
            self.done += take
            if self.done == n:
                self.index, self.done = self.index + 1, 0


@dataclass
class _Agreed:
    """What every rank agreed on before a gather (:func:`_agree`)."""

    has_state: bool  # whether any rank has optimizer state
    longest: int  # the longest stream of the ranks but 0, in elements of one field
    layout: list[tuple[int, int]]  # this rank's pieces: (offset in the full tensor, numel)
    layout_changed: bool  # on any rank since the last gather (the offsets are gathered again)


def _agree(backend: Backend, pieces: list[LocalPiece], names: list[str], device: torch.device, group: Any) -> _Agreed:
    """Collective (one tiny ``all_reduce``): whether any rank has optimizer state, the piece count, the longest
    stream of the ranks but 0, whether any rank's layout changed, and the names of the optimizer's state fields
    (a checksum; a rank without state yet does not count). Ranks that disagree on the pieces or the fields raise."""
    rank, world = _dist()
    has_state = any(p.step is not None for p in pieces)
    layout = [(p.offset, p.numel) for p in pieces]
    if world == 1:
        return _Agreed(has_state, 0, layout, False)
    n = len(pieces)
    local_len = sum(p.numel for p in pieces) if rank != 0 else 0
    cache = getattr(backend, "_gather_layout", None)
    changed = int(cache is None or cache[0] != layout)
    crc = zlib.crc32(",".join(names).encode())  # < 2**32
    largest, smallest = (crc, crc) if has_state else (-1, 2**32)
    stateless_rank0 = int(rank == 0 and not has_state)
    figures = [int(has_state), n, -n, local_len, changed, largest, -smallest, stateless_rank0]
    agree = torch.tensor(figures, dtype=torch.int64, device=device)
    _record("all_reduce", agree)
    dist.all_reduce(agree, op=dist.ReduceOp.MAX, group=group)
    failpoint("gather.after_sizes")
    n_max, n_min = int(agree[1]), -int(agree[2])
    if n_max != n or n_min != n:
        raise RuntimeError(f"ranks disagree on the adapter: {n} tensors here, {n_min}..{n_max} elsewhere")
    if bool(agree[0]) and (int(agree[5]) != -int(agree[6]) or agree[7]):  # every rank sees the same
        raise RuntimeError(f"ranks disagree on the optimizer's state: fields {names or 'none'} here, others elsewhere")
    return _Agreed(bool(agree[0]), int(agree[3]), layout, bool(agree[4]))


def gather_adapter(
    backend: Backend,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    *,
    pieces: list[LocalPiece] | None = None,
    group: Any = None,
) -> AdapterState | None:
    """Collective: every rank must call. Returns the full adapter (and its Adam state) on rank 0, None elsewhere.

    Each rank lays its pieces end to end and the streams are gathered to rank 0 in chunks of ``bucket_bytes``:
    one ``gather`` per chunk, plus one tiny ``all_reduce`` (agree on sizes) and, on a backend's first save, one tiny
    ``gather`` of piece offsets (cached afterwards).
    Only adapter bytes move. Rank 0's extra memory is the adapter plus one chunk per rank; other ranks', one chunk.

    ``pieces``: a snapshot cut into pieces (:meth:`Backend.snapshot`; default: the backend's live pieces).
    ``group``: a CPU (gloo) process group of all ranks to gather over, so that a background thread can gather
    while training runs collectives on the default group.
    """
    rank, world = _dist()
    pieces = backend.local_pieces() if pieces is None else pieces
    names = sorted({name for p in pieces if p.step is not None for name in p.fields} - {WEIGHT_FIELD})
    device = torch.device("cpu") if group is not None else backend.device
    agreed = _agree(backend, pieces, names, device, group)
    fields = [WEIGHT_FIELD, *names] if agreed.has_state else [WEIGHT_FIELD]
    senders = backend.senders()
    if world > 1 and senders is not None and senders < world:  # the other ranks hold copies: they send nothing
        sub = _subgroup(senders, group)
        if rank >= senders:
            return None
        group, world = sub, senders
    # Rank 0 allocates the full result and fills in its own pieces without any communication.
    weights: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    if rank == 0:
        for p in pieces:
            numel = math.prod(p.shape)
            weights[p.key] = torch.empty(numel, dtype=torch.float32)
            if agreed.has_state:
                optim[p.key] = {f: torch.zeros(numel, dtype=torch.float32) for f in fields[1:]}
                optim[p.key]["step"] = torch.tensor(p.step if p.step is not None else 0.0, dtype=torch.float32)
        for p in pieces:
            for f in fields:
                _target(weights, optim, p.key, f)[p.offset : p.offset + p.numel] = _piece_field(p, f)
    if world > 1 and agreed.longest > 0:
        _gather_streams(backend, pieces, fields, agreed, weights, optim, bucket_bytes, device, group, world)
    if rank != 0:
        return None
    shapes = {p.key: p.shape for p in pieces}
    weights = {k: t.view(shapes[k]) for k, t in weights.items()}
    optim = {k: {f: (t.view(shapes[k]) if f != "step" else t) for f, t in d.items()} for k, d in optim.items()}
    return AdapterState(weights, optim)


def _gather_streams(
    backend: Backend,
    pieces: list[LocalPiece],
    fields: list[str],
    agreed: _Agreed,
    weights: dict[str, torch.Tensor],
    optim: dict[str, dict[str, torch.Tensor]],
    bucket_bytes: int,
    device: torch.device,
    group: Any,
    world: int,
) -> None:
    """Collective: the ranks' streams (every piece's fields end to end) gathered to rank 0 in chunks of
    ``bucket_bytes``, one ``gather`` each, and copied by rank 0 into ``weights`` and ``optim`` at each piece's
    offset. The offsets are gathered once (a ``gather`` of the layouts) and cached on the backend."""
    rank, _ = _dist()  # (a sender's rank in the subgroup of senders too: they are the first ranks)
    if agreed.layout_changed:  # piece offsets are fixed for a wrapped model: gathered once, then cached
        meta = torch.tensor(agreed.layout, dtype=torch.int64, device=device).reshape(-1, 2)
        gathered = [torch.empty_like(meta) for _ in range(world)] if rank == 0 else []
        _record("gather", meta)
        dist.gather(meta, gathered if rank == 0 else None, dst=0, group=group)
        backend._gather_layout = (agreed.layout, [m.cpu() for m in gathered])  # type: ignore[attr-defined]
    all_meta = backend._gather_layout[1]  # type: ignore[attr-defined]
    total = agreed.longest * len(fields)
    chunk = max(1, bucket_bytes // 4)
    streams = (
        {r: _Stream([int(x) for x in all_meta[r][:, 1]], len(fields)) for r in range(1, world)}
        if rank == 0
        else {rank: _Stream([p.numel for p in pieces], len(fields))}
    )
    for start in range(0, total, chunk):
        size = min(chunk, total - start)
        buf = torch.zeros(size, dtype=torch.float32, device=device)
        if rank != 0:
            for i, j, src, dst, take in streams[rank].walk(size):
                buf[dst : dst + take] = _piece_field(pieces[i], fields[j])[src : src + take]
        recv = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
        _record("gather", buf)
        dist.gather(buf, recv, dst=0, group=group)
        failpoint("gather.after_chunk")
        if rank == 0:
            assert recv is not None
            for r in range(1, world):
                data = recv[r].cpu()
                for i, j, src, dst, take in streams[r].walk(size):
                    offset = int(all_meta[r][i][0]) + src
                    _target(weights, optim, pieces[i].key, fields[j])[offset : offset + take] = data[dst : dst + take]
            del recv


def _target(weights: dict, optim: dict, key: str, field: str) -> torch.Tensor:
    return weights[key] if field == WEIGHT_FIELD else optim[key][field]


# ---------------------------------------------------------------------------------------------- load


def broadcast_json(obj: Any, group: Any = None, src: int = 0) -> Any:
    """Collective: rank ``src``'s JSON-able object on every rank (two broadcasts; no pickle). ``src`` is a global
    rank."""
    rank, world = _dist()
    if world == 1:
        return obj
    device = comm_device(group)
    if rank == src:
        payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(device)
        length = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        length = torch.empty(1, dtype=torch.int64, device=device)
    _record("broadcast", length)
    dist.broadcast(length, src=src, group=group)
    if rank != src:
        payload = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    _record("broadcast", payload)
    dist.broadcast(payload, src=src, group=group)
    return json.loads(bytes(payload.cpu().numpy().tobytes()).decode())


def any_rank(flag: bool, group: Any = None) -> bool:
    """Collective: True on every rank if ``flag`` is True on any rank (one tiny all-reduce)."""
    if _dist()[1] == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=comm_device(group))
    _record("all_reduce", t)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


_SUBGROUPS: dict[tuple[int, int], Any] = {}


def _subgroup(k: int, parent: Any) -> Any:
    """Collective the first time (every rank of ``parent`` calls it): the group of ranks 0..k-1, on the backend of
    ``parent`` (the gloo group of background saves, or the default group)."""
    key = (k, id(parent))
    if key not in _SUBGROUPS:
        from dist_lora.distributed import group_timeout

        backend = dist.get_backend(parent) if parent is not None else None
        _SUBGROUPS[key] = dist.new_group(ranks=list(range(k)), backend=backend, timeout=group_timeout())
    return _SUBGROUPS[key]


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
