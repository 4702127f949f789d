"""``dist-lora check``: a run's config tried in one process before a job is queued (no GPU, no process group, no
weight read).

What a rank does before its first step that a bad setting makes fail is done as the trainer does it: the config and
its DeepSpeed JSON read, the global batch split over the world size, the base built on the meta device from its
``config.json`` (the attention kernel set, LoRA applied by PEFT with every name checked, NF4 planned), the tokenizer
loaded, the data tokenized into this machine's cache (where a job on this machine then finds it) and the run's length
worked out. Then what each rank will hold of the model as its engine lays it out: the frozen base (FSDP2's row
chunks, ZeRO-3's partitions, or a whole replica) and the trainable state, and, offloaded, how much of them is in host
memory; under FSDP2 and ZeRO-3, the most they hold gathered for compute at once (at least). Activations come on top;
the trainer logs each step's peak (``peak_memory_gib`` in the metrics).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from dist_lora.config import ConfigError, RunConfig
from dist_lora.data import TARGET_CLOSE, TARGET_OPEN

OPTIMIZER_COPIES = 3  # per trained element besides itself: its gradient and AdamW's exp_avg and exp_avg_sq


@dataclass(frozen=True)
class Layout:
    """How an engine lays a model out over ``world`` ranks."""

    engine: str  # fsdp, deepspeed, ddp or single
    world: int
    shards: int  # the ranks that share each frozen tensor (1: each holds it whole)
    zero_stage: int | None = None
    persistence_threshold: int = 0  # ZeRO-3: a tensor of at most this many elements is also kept whole
    cast: torch.dtype | None = None  # the dtype the engine casts the base to (DeepSpeed's bf16), or None
    reduce_bucket: int | None = None  # DeepSpeed: the JSON's reduce_bucket_size; None: sized to the adapter
    zero_modelled: bool = True  # DeepSpeed: False where the JSON lays its optimizer out otherwise (data_types, ...)
    offload_optimizer: bool = False  # the trainable state in host memory (ZeRO-Offload; FSDP2's cpu_offload)
    offload_param: bool = False  # the sharded base in host memory (ZeRO-3's offload_param; FSDP2's cpu_offload)
    grad_accum: int = 1  # micro-batches a step (ZeRO-2's offload keeps gradients apart between them)
    zero: dict[str, Any] = field(default_factory=dict, compare=False)  # DeepSpeed: the engine's zero_optimization

    def describe(self) -> str:
        if self.engine == "fsdp":
            replicas = self.world // self.shards
            hsdp = f" (HSDP: {replicas} replica groups)" if replicas > 1 else ""
            return f"FSDP2, each tensor sharded over {self.shards} rank(s){hsdp}"
        if self.engine == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage} over {self.world} rank(s)"
        return "DDP, a whole replica on each rank" if self.engine == "ddp" else "one process"


def layout(cfg: RunConfig, world: int, nproc_per_node: int | None = None) -> Layout:
    """The engine's layout over ``world`` ranks, refusing what the engine refuses when it starts: the single
    backend on several ranks, HSDP's replica groups not dividing the world, a DeepSpeed JSON that contradicts
    dist_lora's config (or, ``parallel.replicate: nodes``, no ``nproc_per_node`` to count the nodes by)."""
    p, t = cfg.parallel, cfg.train
    if world < 1 or (nproc_per_node is not None and (nproc_per_node < 1 or world % nproc_per_node)):
        raise ConfigError(
            f"--world-size {world} must be at least 1 and a whole number of nodes of --nproc-per-node {nproc_per_node}"
        )
    if p.backend == "single" and world > 1:
        raise ConfigError(
            f"parallel.backend is single, which trains in one process, and the world size is {world}: set "
            "parallel.backend to fsdp, deepspeed or ddp"
        )
    if p.backend == "fsdp":
        from dist_lora.backends.fsdp import check_replica_groups, replica_groups

        if p.replicate == "nodes" and not nproc_per_node:
            raise ConfigError("parallel.replicate: nodes is one replica group per node: give --nproc-per-node")
        replicas = replica_groups(p.replicate, world, nproc_per_node or world)
        check_replica_groups(replicas, world)
        return Layout("fsdp", world, world // replicas, offload_optimizer=p.cpu_offload, offload_param=p.cpu_offload)
    if p.backend == "deepspeed":
        from dist_lora.backends.deepspeed_config import ds_config
        from dist_lora.train import grad_accum_steps

        bf16 = p.mixed_precision == "bf16"
        config = ds_config(
            zero_stage=p.zero_stage,
            micro_batch_size=t.micro_batch_size,
            grad_accum=grad_accum_steps(t, world),
            bf16=bf16,
            extra=p.deepspeed_config,
            max_grad_norm=t.max_grad_norm,
            world_size=world,
            adamw=t.adamw(),
            cpu_offload=p.cpu_offload,
        )
        zero = config["zero_optimization"]
        threshold = int(zero.get("stage3_param_persistence_threshold", 0))
        bucket = zero.get("reduce_bucket_size")  # (ds_config sizes it to the adapter when the JSON does not)
        stage = p.zero_stage
        return Layout(
            "deepspeed",
            world,
            world if stage == 3 else 1,
            stage,
            threshold,
            torch.bfloat16 if bf16 else None,
            reduce_bucket=None if bucket is None else int(bucket),
            zero_modelled="data_types" not in config
            and not zero.get("parameter_alignment")
            and not zero.get("zenflow")
            and float(zero.get("offload_optimizer", {}).get("ratio", 1.0)) == 1.0,  # (a partial offload)
            offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") == "cpu",
            offload_param=stage == 3 and zero.get("offload_param", {}).get("device", "none") == "cpu",
            grad_accum=grad_accum_steps(t, world),
            zero=zero,
        )
    return Layout(p.backend, world, 1)


def _fsdp_held(shape: tuple[int, ...], shards: int) -> int:
    """Elements FSDP2 gives each rank of a tensor sharded by rows: ``ceil(rows / shards)`` rows (padded)."""
    shape = shape or (1,)
    return math.ceil(shape[0] / shards) * math.prod(shape[1:])


def frozen_bytes(model: nn.Module, lay: Layout) -> int:
    """Bytes of the frozen base (the parameters that do not train, and every buffer) that each rank holds, as the
    engine allocates them: FSDP2 gives every rank ``ceil(rows / shards)`` rows of each tensor (the last ranks'
    padded), or an equal slice of each expert of a MoE layer with fewer experts than shards (``shard_dim``);
    ZeRO-3 a partition of ``ceil(elements / world)`` of each (padded likewise), plus the whole of a tensor under its
    persistence threshold, gathered into a buffer of ``world`` partitions at the first forward and kept; the other
    engines all of it. An NF4 weight counts its 4-bit data and scalers (QLoRA shards only weights whose rows split
    evenly). Every rank holds the same."""
    return _frozen(model, lay)[0]


def frozen_host_bytes(model: nn.Module, lay: Layout) -> int:
    """Of :func:`frozen_bytes`, what is in host memory: FSDP2's shards under ``cpu_offload``, ZeRO-3's partitions
    under ``offload_param`` (a persistent tensor's whole copy is on the device); the buffers stay on the device."""
    return _frozen(model, lay)[1]


def _frozen(model: nn.Module, lay: Layout) -> tuple[int, int]:
    """(all of it, in host memory): see :func:`frozen_bytes`."""
    from dist_lora.backends.fsdp import shard_dim
    from dist_lora.quantize import is_nf4, nf4_bytes

    total = sum(b.numel() * b.element_size() for b in model.buffers())
    host = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        if is_nf4(p):
            total += nf4_bytes(p) // lay.shards
            host += nf4_bytes(p) // lay.shards if lay.offload_param else 0
            continue
        shape = tuple(p.shape)
        size = lay.cast.itemsize if lay.cast is not None and p.is_floating_point() else p.element_size()
        if lay.engine == "fsdp" and lay.shards > 1:
            held = p.numel() // lay.shards if shard_dim(shape, lay.shards) else _fsdp_held(shape, lay.shards)
            offloaded = held
        elif lay.engine == "deepspeed" and lay.zero_stage == 3:  # (a persistent tensor: gathered whole, padded)
            part = math.ceil(p.numel() / lay.world)
            held = part + (part * lay.world if p.numel() <= lay.persistence_threshold else 0)
            offloaded = part
        else:
            held = offloaded = p.numel()
        total += held * size
        host += offloaded * size if lay.offload_param else 0
    return total, host


def trainable_state_bytes(model: nn.Module, lay: Layout, groups: list[list[nn.Parameter]] | None = None) -> int | None:
    """Bytes of the adapter's state on each rank at the optimizer step: the trainable parameters, their gradients
    and AdamW's two moments, sharded as the base on FSDP2, whole on DDP and a single process; under DeepSpeed as its
    ZeRO stage lays them out (:func:`_zero_trainable`; ``groups``: the optimizer's parameter groups, each flattened
    on its own). None under DeepSpeed with a ``data_types`` section, ``parameter_alignment``, ZenFlow or a partial
    offload (``offload_optimizer.ratio``), which lay it out otherwise."""
    held = _trainable(model, lay, groups)
    return None if held is None else held[0] + held[1]


def trainable_host_bytes(model: nn.Module, lay: Layout, groups: list[list[nn.Parameter]] | None = None) -> int | None:
    """Of :func:`trainable_state_bytes`, what is in host memory: all of it under FSDP2's ``cpu_offload``, ZeRO's
    offloaded buffers under DeepSpeed's ``offload_optimizer`` (:func:`_zero_trainable`), else nothing."""
    held = _trainable(model, lay, groups)
    return None if held is None else held[1]


def _trainable(model: nn.Module, lay: Layout, groups: list[list[nn.Parameter]] | None) -> tuple[int, int] | None:
    """(on the device, in host memory): see :func:`trainable_state_bytes`."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if lay.engine == "deepspeed":
        return _zero_trainable(groups or [trained], lay) if lay.zero_modelled else None
    total = 0
    for p in trained:
        held = _fsdp_held(tuple(p.shape), lay.shards) if lay.engine == "fsdp" else p.numel()
        total += held * p.element_size() * (1 + OPTIMIZER_COPIES)
    return (0, total) if lay.offload_optimizer else (total, 0)


NORM_BYTES = 8  # ZeRO-Offload: a float64 norm of each gradient it copies to host memory


def _zero_trainable(groups: list[list[nn.Parameter]], lay: Layout) -> tuple[int, int]:
    """The adapter's state under DeepSpeed at the optimizer step, per rank, (on the device, in host memory).
    DeepSpeed flattens each parameter group on its own (LoRA+'s A, B and bias groups: three) and steps them one after
    another; its dtype is bf16 under its bf16, else float32, and every float32 copy is a partition of a group
    (``P_i`` elements, ``P`` for all):

    - ZeRO-1/2: each group's flat parameters whole, padded to a multiple of twice the world size, in the engine's
      dtype (it casts the model to bf16 under its bf16), and its float32 master partition and AdamW's two moments
      (``3 * P * 4``). As it steps group ``i`` it holds that group's float32 gradient partition (``P_i * 4``) and,
      but for the last group, the reduced gradients of every tensor that reaches into the rank's partition of any
      group, each whole, in the engine's dtype (freed before the last group's step; :func:`_reaching`). The
      backward holds the gradients whole on top while it reduces them, and frees them before the step.
      With ``offload_optimizer`` the flat parameters stay on the device beside a staging buffer of the largest
      tensor and a norm of each tensor reaching into the partition (:data:`NORM_BYTES`); host memory holds the
      master partition, its gradient and the moments (``4 * P * 4``, every group's gradient kept), a copy of the
      partition in the engine's dtype and a staging buffer of the largest tensor. A half-precision base without
      DeepSpeed's bf16 sums its gradients in float32 on the device (``P * 4``; ZeRO-1 also every tensor's float32
      gradient whole until the step); otherwise ZeRO-2 sums a step's micro-batches in host memory, each reaching
      tensor's gradient whole in the engine's dtype (:func:`_zero12_offloaded`).
    - ZeRO-3: each parameter's partition (``ceil(numel / world)``; one under the persistence threshold takes no more,
      measured) in the engine's dtype, its gradient partition (in the parameter's own dtype under DeepSpeed's bf16,
      float32 otherwise), the float32 master and AdamW's two moments (``3 * P * 4``), the float32 gradient of the
      group being stepped (the largest ``P_i * 4``), and the gradient reduction bucket in DeepSpeed's dtype, kept
      for the run (the adapter's elements, or the JSON's ``reduce_bucket_size``). With ``offload_optimizer`` the
      gradient partitions, the master, the moments and every group's float32 gradient (``P * 4``) are in host
      memory, the bucket and a norm of each tensor on the device; with ``offload_param`` the parameter partitions
      are in host memory too.

    Measured equal (to AdamW's step counters) with one group and with LoRA+'s, at 2 and 3 ranks (offloaded: at 3),
    the host memory's share told by what DeepSpeed pins (tests/test_check.py)."""
    zero_dtype = 2 if lay.cast is not None else 4
    own = groups[0][0].element_size()  # (lora.one_trainable_dtype: one dtype for all)
    size = 2 if lay.cast is not None else own
    numel = sum(p.numel() for params in groups for p in params)
    if lay.zero_stage != 3:
        align = 2 * lay.world
        parts = [math.ceil(sum(p.numel() for p in params) / align) * align // lay.world for params in groups]
        flat = sum(part * lay.world * size for part in parts)
        reaching = _reaching(groups, parts, lay.world)
        if lay.offload_optimizer:
            return _zero12_offloaded(lay, groups, parts, reaching, flat, size)
        *first, last = parts
        reduced = max(sum(p.numel() for p in ps) for ps in reaching) * size
        stepping = max([last * 4] + [part * 4 + reduced for part in first])
        return flat + sum(3 * part * 4 for part in parts) + stepping, 0
    parts = [sum(math.ceil(p.numel() / lay.world) for p in params) for params in groups]
    part = sum(parts)
    grad = own if lay.cast is not None else 4
    bucket = (lay.reduce_bucket or numel) * zero_dtype
    if lay.offload_optimizer:
        partitions = part * size
        host = part * grad + 3 * part * 4 + part * 4  # (each group's float32 gradient kept)
        device = bucket + NORM_BYTES * sum(len(params) for params in groups)
        return (device, host + partitions) if lay.offload_param else (device + partitions, host)
    return part * size + part * grad + 3 * part * 4 + max(parts) * 4 + bucket, 0


def _zero12_offloaded(
    lay: Layout,
    groups: list[list[nn.Parameter]],
    parts: list[int],
    reaching: list[list[nn.Parameter]],
    flat: int,
    size: int,
) -> tuple[int, int]:
    """ZeRO-1/2 with ``offload_optimizer``: (on the device, in host memory) on the rank that holds the most, whose
    partitions the tensors ``reaching[rank]`` reach into (``flat``: the flat groups' bytes); see
    :func:`_zero_trainable`."""
    trained = [p for params in groups for p in params]
    staging = max(p.numel() for p in trained) * size  # (one on each side)
    device, host = flat + staging, sum(parts) * (16 + size) + staging
    accumulated = False
    if lay.cast is None and trained[0].element_size() == 2:  # a half-precision base: gradients summed in float32
        device += sum(parts) * 4
        if lay.zero_stage == 1:  # (and, until the step, every tensor's float32 gradient whole)
            device += sum(p.numel() for p in trained) * 4
    else:  # ZeRO-2 sums a step's micro-batches in host memory, each tensor whole
        accumulated = lay.zero_stage == 2 and lay.grad_accum > 1
    norms, kept = max(
        ((NORM_BYTES * len(ts), sum(p.numel() for p in ts) * size if accumulated else 0) for ts in reaching), key=sum
    )
    return device + norms, host + kept


def _reaching(groups: list[list[nn.Parameter]], parts: list[int], world: int) -> list[list[nn.Parameter]]:
    """ZeRO-1/2: for each rank, the tensors that reach into its partition of each flat group (``parts[i]``
    elements): a tensor across a partition boundary reaches into the partitions on both sides."""
    found = []
    for rank in range(world):
        reaching = []
        for params, part in zip(groups, parts, strict=True):
            low, high, start = rank * part, (rank + 1) * part, 0
            for p in params:
                if start < high and start + p.numel() > low:
                    reaching.append(p)
                start += p.numel()
        found.append(reaching)
    return found


def gathered_bytes(model: nn.Module, cfg: RunConfig, shards: int) -> int:
    """What FSDP2 holds gathered per rank for compute, in the dtype it computes in (bf16 under ``mixed_precision:
    bf16``). With ``keep_base_gathered``, the frozen base, gathered at the first forward for the run. Otherwise the
    most its groups (as :meth:`dist_lora.backends.fsdp.FSDPBackend.wrap` makes them) hold at once, gathered and
    being gathered, with the buffers FSDP2 gathers each into, in the order FSDP2 gathers and frees them
    (:func:`_fsdp2_gathered`). At ``shards`` 1 nothing is all-gathered (no buffer), and NF4 weights stay local,
    never gathered (``ignored_params``: :meth:`~dist_lora.backends.fsdp.FSDPBackend.wrap`)."""
    from dist_lora.backends.fsdp import _embedding_groups, shard_dim
    from dist_lora.model import transformer_blocks
    from dist_lora.quantize import is_nf4, nf4_bytes

    bf16 = cfg.parallel.mixed_precision == "bf16"

    def size(p: nn.Parameter) -> int:
        return 2 if bf16 and p.is_floating_point() else p.element_size()

    def gathered(params: list[nn.Parameter]) -> int:
        return sum(nf4_bytes(p) if is_nf4(p) else p.numel() * size(p) for p in params if shards > 1 or not is_nf4(p))

    def buffer(params: list[nn.Parameter]) -> int:  # each rank's padded rows (or equal slices), from every rank
        if shards == 1:
            return 0
        padded = [
            p.numel() if shard_dim(tuple(p.shape), shards) else shards * _fsdp_held(tuple(p.shape), shards)
            for p in params
        ]
        return sum(nf4_bytes(p) if is_nf4(p) else n * size(p) for p, n in zip(params, padded, strict=True))

    if cfg.parallel.keep_base_gathered:
        return gathered([p for p in model.parameters() if not p.requires_grad])
    blocks, ends = transformer_blocks(model), _embedding_groups(model)
    names = [str(i) for i in range(len(blocks))]
    modules = dict(zip(names, blocks))
    if ends:  # (FSDP2's groups in forward order, after the root's own)
        modules = {"embedding": ends[0], **modules, "lm_head": ends[1]}
    groups = {name: list(dict.fromkeys(m.parameters())) for name, m in modules.items()}
    grouped = {id(p) for params in groups.values() for p in params}
    groups = {"root": [p for p in dict.fromkeys(model.parameters()) if id(p) not in grouped], **groups}
    everything = cfg.parallel.reshard_after_forward is False
    held = set(groups) if everything else {"root", *names[-1:], *(["lm_head"] if ends else [])}
    return _fsdp2_gathered(
        {name: gathered(params) for name, params in groups.items()},
        {name: buffer(params) for name, params in groups.items()},
        held,
        names,
        0 if everything else cfg.parallel.prefetch,
        bool(ends) and any(p.requires_grad for p in groups["embedding"]),
    )


def _fsdp2_gathered(
    unsharded: dict[str, int],
    buffers: dict[str, int],
    held: set[str],
    blocks: list[str],
    prefetch: int,
    embedding_trains: bool,
) -> int:
    """The most FSDP2 holds at once, gathered and being gathered, over a forward and a backward of groups of these
    ``unsharded`` bytes, gathered into ``buffers`` (each rank's padded shard, from every rank; 0 where nothing is
    all-gathered), in forward order (the root's first); ``held``: the groups not resharded after forward; ``blocks``:
    the transformer blocks' groups, which ``prefetch`` (explicit prefetching) gathers ahead. FSDP2's order
    (``FSDPParamGroup``, torch 2.13): a group's all-gather allocates its buffer; its wait copies the buffer out into
    the parameters, and in forward keeps the buffer (so that the copy overlaps the next group's all-gather) until the
    next group's wait, the last one's until the backward; in backward it frees it at once, then gathers ahead: the
    blocks ``prefetch`` back with explicit prefetching, else the group before it in forward order. A group is
    resharded after its forward unless held, and after its backward. The embedding's backward runs only where it
    trains; otherwise the first block's prefetch gathers it for nothing, until the step's end."""
    live: set[str] = set()
    gathering: dict[str, int] = {}
    kept, most = 0, 0

    def note(extra: int = 0) -> None:
        nonlocal most
        most = max(most, sum(unsharded[g] for g in live) + sum(gathering.values()) + kept + extra)

    def gather(group: str) -> None:
        if group not in live and group not in gathering:
            gathering[group] = buffers[group]
            note()

    def wait(group: str, forward: bool) -> None:
        nonlocal kept
        if group in live:  # (held from its forward: nothing to gather or wait for)
            return
        gather(group)
        if forward:
            kept = 0  # (the previous group's buffer, freed at this wait)
        note(unsharded[group])  # copied out, its buffer still there
        live.add(group)
        buffer = gathering.pop(group)
        if forward:
            kept = buffer
        note()

    forward = list(unsharded)
    for group in forward:
        wait(group, forward=True)
        if prefetch and group in blocks:
            b = blocks.index(group)
            for ahead in blocks[b + 1 : b + 1 + prefetch]:
                gather(ahead)
        if group not in held:
            live.discard(group)
    kept = 0
    order = [*forward[1:], forward[0]]  # (their post-forward hooks' order: the root's last)
    for group in [forward[0], *reversed(forward[1:])]:
        if group == "embedding" and not embedding_trains:
            continue
        wait(group, forward=False)
        explicit = []
        if prefetch and group in blocks:
            b = blocks.index(group)
            explicit = blocks[max(0, b - prefetch) : b][::-1]
        i = order.index(group)
        for ahead in explicit or order[max(0, i - 1) : i]:  # (none set: FSDP2's own, the group before)
            gather(ahead)
        if group != forward[0]:
            live.discard(group)
    return most


@dataclass
class Report:
    config: str
    world: int
    layout: str
    base: str
    architecture: str
    base_parameters: int
    base_dtype: str
    lora_layers: int
    trainable_parameters: int
    frozen_bytes_per_rank: int
    trainable_state_bytes_per_rank: int | None
    grad_accum: int
    gathered_bytes_per_rank: int = 0  # FSDP2's groups or ZeRO-3's parameters gathered at once (keep_base_gathered:
    # the whole base)
    gathered_unmodelled: str | None = None  # ZeRO-3: why what it gathers could not be followed
    host_bytes_per_rank: int = 0  # of the frozen base and the trainable state, what is offloaded to host memory
    ranks_per_node: int = 1  # --nproc-per-node, or the whole world on one node
    rows: int | None = None
    eval_rows: int | None = None  # over every eval set
    eval_sets: dict[str, int] | None = None  # named eval sets' rows (data.eval_path as {name: source})
    max_steps: int | None = None
    resume: dict[str, Any] | None = None  # the step resume loads: url, step, backend, world_size, stop_at
    init_from: dict[str, Any] | None = None  # the adapter a fresh run starts from (lora.init_from): url, step, verified
    shown_rows: list[dict[str, Any]] | None = None  # the first training rows, targets marked (data.shown_rows)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def check_dir(cfg: RunConfig) -> None:
    """A local ``checkpoint.dir`` that is a file is refused, as the run's lease on it would be (an object store's
    dir is not looked at unless a resume reads it: a login node may lack its credentials)."""
    from dist_lora.storage import Storage

    ck = cfg.checkpoint
    storage = Storage(ck.dir, ck.storage_options)
    if storage.is_local and storage.kind() == "file":
        raise ConfigError(
            f"checkpoint.dir {ck.dir} is a file, where the run saves its steps in a directory: move it away or "
            "choose another checkpoint.dir"
        )


def check_resume(cfg: RunConfig, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """What ``checkpoint.resume`` will load, checked as a resume checks it before any tensor moves: the step read
    and every file's sha256 verified, then its adapter and AdamW state against the model's (keys, shapes, bias
    mode, LoRA scaling, the base's fingerprint) and no committed step of ``checkpoint.dir`` after it (another
    run's). None for a fresh run ("none", or "auto" over a dir without a committed step). Nothing is written: no
    lease is taken. ``optimizer``: the trainer's over ``model`` (:func:`dist_lora.train.adamw`)."""
    from dist_lora.api import _check_step_fits, _read
    from dist_lora.backends import attach
    from dist_lora.checkpoint import check_no_newer_steps, no_step_error
    from dist_lora.storage import Storage

    ck = cfg.checkpoint
    if ck.resume in (None, "", "none"):
        return None
    auto = ck.resume == "auto"
    loaded = _read(ck.dir if auto else str(ck.resume), ck.storage_options, None)
    if loaded is None:
        if auto:
            return None
        raise no_step_error(Storage(str(ck.resume), ck.storage_options))
    _check_step_fits(loaded, attach(model, optimizer, cfg.lora.bias), with_optimizer=True)
    step = int(loaded.trainer_state.get("step", 0))
    check_no_newer_steps(Storage(ck.dir, ck.storage_options), step)
    state = loaded.trainer_state
    return {"url": loaded.url, "step": step, "backend": state.get("backend"), "world_size": state.get("world_size")}


def check_init(cfg: RunConfig, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The adapter ``lora.init_from`` starts a fresh run from, read (a dist_lora step verified) and checked against
    the model as the trainer loads it: bias mode, keys, shapes, LoRA scaling. None without one."""
    from dist_lora.api import _check_step_fits, read_adapter
    from dist_lora.backends import attach

    if not cfg.lora.init_from:
        return None
    ck = cfg.checkpoint
    loaded = read_adapter(cfg.lora.init_from, ck.storage_options, None, "lora.init_from")
    _check_step_fits(loaded, attach(model, optimizer, cfg.lora.bias), with_optimizer=False)
    return {"url": loaded.url, "step": loaded.trainer_state.get("step"), "verified": loaded.verified}


def build_meta_model(cfg: RunConfig, shards: int) -> Any:
    """The model the trainer builds, on the meta device, in train mode: the base from its config, the attention
    kernel, the chunked loss, activation checkpointing, LoRA (PEFT's, every name checked) and, for QLoRA, the NF4
    weights planned for ``shards``."""
    from dist_lora.lora import apply_lora
    from dist_lora.model import DTYPES, build_on_meta, prepare_base
    from dist_lora.quantize import quantize_base

    m, p = cfg.model, cfg.parallel
    zero3_bf16 = p.backend == "deepspeed" and p.zero_stage == 3 and p.mixed_precision == "bf16"
    dtype = torch.bfloat16 if zero3_bf16 else DTYPES[m.dtype]  # (ZeRO-3 builds in the dtype its engine trains in)
    base = build_on_meta(m.name_or_path, dtype, revision=m.revision)
    prepare_base(base, m.attn_implementation, cfg.train.loss_chunk_tokens, cfg.train.recompute_every())
    model = apply_lora(base, cfg.lora, m.name_or_path, m.revision)
    if m.quantization == "nf4":
        quantize_base(model, shards, torch.device("cpu"))
    return model.train()


def check_run(
    cfg: RunConfig,
    *,
    world: int,
    config_name: str = "",
    nproc_per_node: int | None = None,
    data: bool = True,
    show_rows: int = 0,
    row_ids: list[int] | None = None,
) -> Report:
    """Try ``cfg`` at ``world`` ranks as the trainer would start it (see the module's doc); raise what the trainer
    would raise, else report the run's shape and each rank's share of the model. ``data=False`` skips the data
    and the tokenizer (and so the run's length from ``train.epochs``, and the packing check); ``show_rows``: the
    first training rows as text, their targets marked (:func:`dist_lora.data.shown_rows`), or ``row_ids``: those
    rows (as a non-finite step's error names them)."""
    from dist_lora.data import check_packing, check_vocab, prepare_data, shown_rows
    from dist_lora.lora import _lora_modules
    from dist_lora.model import load_tokenizer
    from dist_lora.train import adamw, check_seq_len, grad_accum_steps, resolved_model, schedule

    cfg = replace(cfg, model=resolved_model(cfg.model))
    accum = grad_accum_steps(cfg.train, world)
    lay = layout(cfg, world, nproc_per_node)
    m = cfg.model
    check_seq_len(cfg)
    rows = eval_rows = named_evals = None
    t = cfg.train
    prepared = None
    if data:  # (without it, no tokenizer is read: the base's config.json alone is checked)
        tokenizer = load_tokenizer(m.name_or_path, revision=m.revision)
        prepared = prepare_data(cfg.data, tokenizer, seed=t.seed)
        rows, eval_rows = len(prepared), (prepared.eval_rows if prepared.evals else None)
        named_evals = {name: len(r) for name, r in prepared.evals.items() if name is not None} or None
        t = schedule(t, rows)
    model = build_meta_model(cfg, lay.shards)
    if prepared is not None:
        check_vocab(model.get_base_model(), prepared)
    if prepared is not None and cfg.data.packing:
        check_packing(model.get_base_model(), prepared)
    optimizer = adamw(model, [p for p in model.parameters() if p.requires_grad], cfg.train)
    check_dir(cfg)
    resume = check_resume(cfg, model, optimizer)
    init = check_init(cfg, model, optimizer) if resume is None else None
    max_steps = t.max_steps if data or t.epochs is None else None  # (train.epochs: known once the data is read)
    stop = t.stop_at_step or max_steps  # (the trainer's own stop)
    if resume is not None and stop is not None:
        resume["stop_at"] = stop
    frozen = [p for p in model.parameters() if not p.requires_grad]
    base, state = _frozen(model, lay), _trainable(model, lay, [g["params"] for g in optimizer.param_groups])
    gathered, unmodelled = 0, None
    if lay.engine == "fsdp":
        gathered = gathered_bytes(model, cfg, lay.shards)
    elif lay.zero_stage == 3:  # (last: it leaves ZeRO's attributes on the model)
        from dist_lora.backends.deepspeed import zero3_gathered_bytes

        try:
            gathered = zero3_gathered_bytes(model, lay.zero, (t.micro_batch_size, cfg.data.seq_len), lay.world)
        except (ValueError, ImportError) as e:  # (ImportError: a login node without DeepSpeed; the job needs it)
            unmodelled = str(e)
    return Report(
        config=config_name,
        world=world,
        layout=lay.describe(),
        base=m.name_or_path,
        architecture=type(model.get_base_model()).__name__,
        base_parameters=sum(p.numel() for p in frozen),
        base_dtype=m.dtype if m.quantization == "none" else f"{m.dtype}, linear weights in NF4",
        lora_layers=sum(1 for _ in _lora_modules(model)),
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        frozen_bytes_per_rank=base[0],
        trainable_state_bytes_per_rank=None if state is None else sum(state),
        grad_accum=accum,
        gathered_bytes_per_rank=gathered,
        gathered_unmodelled=unmodelled,
        host_bytes_per_rank=base[1] + (0 if state is None else state[1]),
        ranks_per_node=nproc_per_node or world,
        rows=rows,
        eval_rows=eval_rows,
        eval_sets=named_evals,
        max_steps=max_steps,
        resume=resume,
        init_from=init,
        shown_rows=shown_rows(prepared.train, tokenizer, row_ids or range(min(show_rows, len(prepared.train))))
        if prepared is not None and (show_rows or row_ids)
        else None,
    )


def device_bytes(r: Report) -> int:
    """What each rank's device holds of the model before any activation: the frozen base, the trainable state and
    what FSDP2 or ZeRO-3 holds gathered for compute (:func:`gathered_bytes`,
    :func:`dist_lora.backends.deepspeed.zero3_gathered_bytes`), less what is offloaded to host memory
    (``parallel.cpu_offload``, DeepSpeed's offload)."""
    state = r.trainable_state_bytes_per_rank or 0
    return r.frozen_bytes_per_rank + state - r.host_bytes_per_rank + r.gathered_bytes_per_rank


def check_fits(r: Report, cfg: RunConfig, device_gb: float) -> None:
    """Refuse a layout whose model state alone exceeds ``device_gb`` (GB, 10^9 bytes) per rank, naming the ways out
    that its engine takes."""
    need, p = device_bytes(r), cfg.parallel
    if need > device_gb * 1e9:
        ways = ["more ranks to shard over (FSDP2, ZeRO-3)"]
        lay = layout(cfg, r.world, r.ranks_per_node)
        if lay.engine == "fsdp" and lay.world > lay.shards:  # HSDP: a whole copy of the base per replica group
            ways.insert(
                0,
                f"fewer replica groups (parallel.replicate={p.replicate} keeps {lay.world // lay.shards} copies of the "
                f"base, each sharded over {lay.shards} ranks; parallel.replicate: 1 shards it over all {lay.world})",
            )
        if p.keep_base_gathered:
            ways.insert(0, "parallel.keep_base_gathered: false")
        if r.gathered_bytes_per_rank and p.backend == "deepspeed":
            ways.append(
                "a lower stage3_max_live_parameters in parallel.deepspeed_config (what ZeRO-3's prefetching may keep "
                "gathered; DeepSpeed's default is 1e9 elements)"
            )
            if not lay.zero.get("stage3_allgather_sequential"):
                ways.append(
                    "stage3_allgather_sequential: true in its zero_optimization (each parameter gathered into a "
                    "buffer of its own, not a shared one that it is then copied out of; a collective per parameter)"
                )
        if cfg.model.quantization == "none" and p.backend != "deepspeed":  # (QLoRA is not on DeepSpeed)
            ways.append("model.quantization: nf4")
        if not p.cpu_offload and p.backend in ("fsdp", "deepspeed"):
            ways.append("parallel.cpu_offload: true")
        held = "the model state and what is gathered for compute take" if r.gathered_bytes_per_rank else None
        raise ConfigError(
            f"{held or 'the model state alone takes'} {_size(need)} per rank, more than --device-memory "
            f"{device_gb:g} GB, before any activation: try {', or '.join(ways)}"
        )


def check_host_fits(r: Report, cfg: RunConfig, host_gb: float) -> None:
    """Refuse an offloaded layout whose host-memory share, summed over a node's ranks, exceeds ``host_gb`` (GB, 10^9
    bytes) per node, naming the way out."""
    need = r.host_bytes_per_rank * r.ranks_per_node
    if need > host_gb * 1e9:
        ways = ["more nodes to shard over (FSDP2, ZeRO-3)"]
        if cfg.model.quantization == "none" and cfg.parallel.backend != "deepspeed":
            ways.append("model.quantization: nf4")
        raise ConfigError(
            f"the offloaded model state takes {_size(need)} of host memory a node ({r.ranks_per_node} rank(s) of "
            f"{_size(r.host_bytes_per_rank)}), more than --host-memory {host_gb:g} GB, before the processes' own: "
            f"try {', or '.join(ways)}"
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def describe(r: Report, cfg: RunConfig) -> str:
    """The report as the command prints it."""
    t = cfg.train
    lines = [
        f"{r.config or 'the config'} at world size {r.world}: nothing refused",
        f"  base      {r.base}: {r.architecture}, {_count(r.base_parameters)} frozen parameters ({r.base_dtype})",
        f"  LoRA      {r.lora_layers} adapted layers, {_count(r.trainable_parameters)} trainable parameters",
        f"  batches   {t.global_batch_size} rows a step: micro batch {t.micro_batch_size} x {r.world} rank(s) x "
        f"{r.grad_accum} accumulated",
    ]
    if r.rows is not None:
        held_out = f", {r.eval_rows} eval rows" if r.eval_rows is not None else ""
        if r.eval_sets:
            held_out = ", eval rows: " + ", ".join(f"{name} {n}" for name, n in r.eval_sets.items())
        lines.append(
            f"  data      {r.rows} training rows of up to {cfg.data.seq_len} tokens{held_out}; {r.max_steps} steps"
        )
    if r.resume is not None:
        saved = f"saved by {r.resume['backend']} at world size {r.resume['world_size']}"
        step, url = r.resume["step"], r.resume["url"]
        lines.append(f"  resume    step {step}, {url} ({saved}): its adapter and AdamW state fit")
        stop = r.resume.get("stop_at")
        if stop is not None and step >= stop:
            lines.append(
                f"            the run is already at step {step} (stop at {stop}): train would do nothing; raise "
                "train.max_steps (or train.stop_at_step) to train on, or use another checkpoint.dir"
            )
        elif stop is not None:
            lines.append(f"            steps {step + 1}..{stop} to go")
    elif cfg.checkpoint.resume not in (None, "", "none"):
        lines.append(f"  resume    nothing committed in {cfg.checkpoint.dir} yet: a fresh run")
    if r.init_from is not None:
        init = r.init_from
        what = f"step {init['step']} of its run, verified" if init["verified"] else "PEFT's: no manifest to verify"
        lines.append(f"  init      the adapter from {init['url']} ({what}): its weights fit")
    elif cfg.lora.init_from and r.resume is not None:
        lines.append("            lora.init_from is not read: the run goes on from its own step")
    state = r.trainable_state_bytes_per_rank
    zero = ", fp32 master copies and the reduction bucket" if cfg.parallel.backend == "deepspeed" else ""
    lines += [
        f"  per rank  {r.layout}",
        f"            frozen base {_size(r.frozen_bytes_per_rank)}",
        f"            trainable state {_size(state)} (the adapter, its gradients, AdamW's two moments{zero})"
        if state is not None
        else "            trainable state: not modelled for this DeepSpeed layout (data_types, parameter_alignment, "
        "zenflow, a partial offload)",
    ]
    ahead = ""
    if r.gathered_bytes_per_rank:
        gathered, ahead = _size(r.gathered_bytes_per_rank), " and what a GPU's streams hold on to"
        if cfg.parallel.keep_base_gathered:
            lines.append(f"            the whole base kept gathered (parallel.keep_base_gathered) {gathered}")
            ahead = ""
        elif cfg.parallel.backend == "deepspeed":
            lines.append(
                f"            gathered for compute, at least {gathered} (ZeRO-3's parameters at once, with its "
                "all-gathers' buffers: what it prefetches, up to stage3_max_live_parameters, and reuses)"
            )
        elif cfg.parallel.reshard_after_forward is False:
            lines.append(f"            gathered for compute: the whole model and its all-gather buffers {gathered}")
        else:
            lines.append(
                f"            gathered for compute, at least {gathered} (FSDP2's groups at once, with their all-gather "
                "buffers)"
            )
    elif r.gathered_unmodelled:
        lines.append(f"            gathered for compute: not modelled, {r.gathered_unmodelled}")
        ahead = " and what ZeRO-3 gathers for compute"
    if r.host_bytes_per_rank:
        host, on_device = _size(r.host_bytes_per_rank), _size(device_bytes(r))
        node = f" ({_size(r.host_bytes_per_rank * r.ranks_per_node)} a node)" if r.ranks_per_node > 1 else ""
        lines.append(
            f"            in host memory {host}{node}: the offloaded share of the frozen base and trainable state"
        )
        lines.append(f"            on the device {on_device}: the rest of them, and what is gathered")
    lines.append(f"{'':12}+ activations{ahead} (the metrics' peak_memory_gib)")
    for row in r.shown_rows or []:
        lines.append(
            f"row {row['row']}: {row['tokens']} tokens, {row['targets']} targets {TARGET_OPEN}marked{TARGET_CLOSE}, "
            f"{len(row['samples'])} sample(s)"
        )
        for i, text in enumerate(row["samples"]):
            lines.append(f"  sample {i}:" if len(row["samples"]) > 1 else "  text:")
            lines += [f"    {line}" for line in text.split("\n")]
    return "\n".join(lines)
