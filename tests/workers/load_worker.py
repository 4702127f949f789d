"""One rank of the sharded-loading test (tests/test_sharded_load.py): build each base the trainer's way, compare.

argv[1] is JSON: {"engines": {name: [overrides]}, "bases": [[dir, [overrides of this base]], ...], "overrides": [...],
"out": dir}; a case is reported as "engine:base:model.dtype". For each engine (FSDP2 first: a ZeRO-3 model makes
transformers build under zero.Init) and base, the Trainer builds the model as it trains it (FSDP2: meta device, then
each rank reads its rows; ZeRO-3: partitioned at construction, then each rank fills its partition). Each rank then
builds the reference the full way in one process (seed, from_pretrained, PEFT LoRA) and checks that every parameter
it holds, the base and the adapter alike, equals the matching slice of the reference bit for bit. Logits of a fixed
batch are written by rank 0 for both. Rank r writes out/rank{r}.json.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dist_lora.config import load_config
from dist_lora.distributed import shutdown
from dist_lora.lora import apply_lora, base_key, canonical_name
from dist_lora.model import hub_snapshot, load_base
from dist_lora.train import DTYPES, Trainer
from dist_lora.weights import BaseWeights
from tests.dist_utils import TINY, mapped_file

REPLICAS = [1]  # FSDP2's replica groups in the build under way (HSDP: more than one)


def fsdp_shard(backend) -> tuple[int, int]:
    """(this rank's shard, how many shards) of FSDP2: over the whole world, or within its replica group (HSDP's
    mesh is (replicate, shard), so the ranks of one group are consecutive)."""
    shards = backend.world_size // REPLICAS[0]
    return backend.rank % shards, shards


def local_and_expected(backend, name: str, p, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a parameter and the same share cut from the reference's full tensor."""
    rank = backend.rank
    if hasattr(p, "ds_tensor"):  # ZeRO-3: a contiguous range of the flattened tensor (the padding is not compared)
        part = p.ds_tensor.numel()
        valid = max(0, min(part, ref.numel() - rank * part))
        return p.ds_tensor.detach().reshape(-1)[:valid], ref.reshape(-1)[rank * part : rank * part + valid]
    if hasattr(p, "to_local"):  # FSDP2: rows [i*c, (i+1)*c) of dim 0, shard i of n, c = ceil(rows / n)
        local = p.to_local().detach()
        shard, shards = fsdp_shard(backend)
        if sliced(p):  # a MoE layer's experts: a slice of each
            size = ref.shape[1] // shards
            return local, ref[:, shard * size : (shard + 1) * size]
        chunk = -(-ref.shape[0] // shards)
        start = min(shard * chunk, ref.shape[0])
        return local, ref[start : start + local.shape[0]]
    return p.detach(), ref


def held_whole(backend, p) -> torch.Tensor | None:
    """This rank's share of a frozen base parameter when it is not padded (the last rank of an uneven split gets a
    padded copy); None otherwise."""
    if p.requires_grad:
        return None
    if hasattr(p, "ds_tensor"):
        part = p.ds_tensor.numel()
        return p.ds_tensor if (backend.rank + 1) * part <= p.ds_numel else None
    if hasattr(p, "to_local"):
        local = p.to_local()
        return local if local.shape[0] == -(-p.shape[0] // fsdp_shard(backend)[1]) else None
    return None


def held_bytes(module) -> tuple[int, int | None]:
    """(the frozen base's bytes, the trainable state's bytes) this rank holds, as the engine itself sized them:
    FSDP2's padded shard of each parameter (its FSDPParam's own size), ZeRO-3's partition (plus the whole tensor it
    keeps of a persistent one once gathered, padded to whole partitions), a whole tensor otherwise; every buffer
    whole. The trainable state is each trained shard four times over (itself, its gradient, AdamW's two moments); None under DeepSpeed, whose flat groups and
    buckets tests/workers/state_worker.py measures."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = {}
    for m in module.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            for fp in group.fsdp_params if group is not None else ():
                fsdp[id(fp.sharded_param)] = math.prod(fp.padded_sharded_param_size)
    frozen = sum(b.numel() * b.element_size() for b in module.buffers())
    trained = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            held = p.ds_tensor.numel() + (p.ds_numel_aligned if getattr(p, "ds_persist", False) else 0)
            size = p.ds_tensor.element_size()
        else:
            held, size = fsdp.get(id(p), p.numel()), p.element_size()
        if p.requires_grad:
            trained += held * size * 4
        else:
            frozen += held * size
    deepspeed = any(hasattr(p, "ds_tensor") for p in module.parameters())
    return frozen, None if deepspeed else trained


def reduce_buckets(backend) -> dict[str, int] | None:
    """ZeRO-3's gradient reduction buckets as allocated (kept for the whole run), in elements, and the elements
    that train; None on FSDP2."""
    zero = getattr(backend, "zero", None)
    if zero is None:
        return None
    trained = sum(p.ds_numel for p in backend.model.parameters() if p.requires_grad)
    return {"allocated": [b.buffer.numel() for b in zero.ipg_buckets.values()], "trained": trained}


def estimated_bytes(cfg, world: int) -> tuple[int, int | None]:
    """What ``dist-lora check`` reports for ``cfg`` at ``world`` ranks: the frozen base and the trainable state per
    rank, from the model built on the meta device."""
    from dist_lora.check import build_meta_model, frozen_bytes, layout, trainable_state_bytes

    lay = layout(cfg, world)
    model = build_meta_model(cfg, lay.shards)
    return frozen_bytes(model, lay), trainable_state_bytes(model, lay)


def base_files(base: str) -> set[Path]:
    """The files of a base directory, or of a hub id's snapshot in the cache, as a map names them (a snapshot's
    files are symlinks to the cache's blobs)."""
    directory = Path(base) if Path(base).is_dir() else hub_snapshot(base)
    return {p.resolve() for p in directory.iterdir()}


def file_backed(t: torch.Tensor, files: set[Path]) -> bool:
    """Whether ``t``'s memory is a map of one of the base's ``files``."""
    path = mapped_file(t)
    return path is not None and Path(path) in files


def sliced(p) -> bool:
    """Whether FSDP2 shards ``p`` on its second dim (a MoE layer's experts, fewer than the shards)."""
    return any(getattr(placement, "dim", 0) == 1 for placement in getattr(p, "placements", ()))


def padded(backend, p) -> bool:
    """Whether this rank's FSDP2 shard of a frozen parameter is the last, padded one of an uneven split."""
    return not p.requires_grad and hasattr(p, "to_local") and not sliced(p) and held_whole(backend, p) is None


MAPPED: set[str] = set()  # the base tensors this rank asked the files for as maps, in the build under way
AHEAD: set[tuple[str, int, int]] = set()  # (file, first byte, bytes) of each range the build read ahead
USED: set[tuple[str, int, int]] = set()  # ... of each range it then read or mapped
MISSED: list[tuple[str, int, int]] = []  # views that did not get the read-ahead's map


def _recording(mapped):
    def record(self, key, start, stop, dtype):
        MAPPED.add(key)
        return mapped(self, key, start, stop, dtype)

    return record


def record_read_ahead() -> None:
    """Record what BaseWeights reads ahead, what the load then reads or maps, and the views that were not handed
    the read-ahead's map (the read-ahead guessed this rank's share wrong)."""
    import dist_lora.weights as weights

    read_ahead, make_map, view, read = BaseWeights.read_ahead, weights._map, BaseWeights._view, BaseWeights._read
    ahead = [False]

    def reading_ahead(self, share, view_dtype):
        ahead[0] = True
        try:
            return read_ahead(self, share, view_dtype)
        finally:
            ahead[0] = False

    def mapping(path, begin, nbytes):
        if ahead[0]:
            AHEAD.add((str(path), begin, nbytes))
        return make_map(path, begin, nbytes)

    def viewing(self, entry, first, last, dtype):
        if dtype == entry.dtype and last > first:
            used = (entry.path, entry.offset + first * dtype.itemsize, (last - first) * dtype.itemsize)
            USED.add((str(used[0]), *used[1:]))
            if used not in self._ahead:
                MISSED.append((str(used[0]), *used[1:]))
        return view(self, entry, first, last, dtype)

    def reading(entry, first, last, shape, out):
        if last > first:
            size = entry.dtype.itemsize
            USED.add((str(entry.path), entry.offset + first * size, (last - first) * size))
        return read(entry, first, last, shape, out)

    BaseWeights.read_ahead, weights._map = reading_ahead, mapping
    BaseWeights._view, BaseWeights._read = viewing, staticmethod(reading)


def main() -> None:
    BaseWeights.mapped = _recording(BaseWeights.mapped)
    record_read_ahead()
    args = json.loads(sys.argv[1])
    out = Path(args["out"])
    report: dict[str, dict] = {}
    cases = [(engine, base, own) for engine in args["engines"] for base, own in args["bases"]]
    for i, (engine, base, own) in enumerate(cases):
        overrides = [*args["overrides"], *args["engines"][engine], *own]
        overrides += [f"model.name_or_path={base}", f"checkpoint.dir={out / f'ckpt{i}'}"]
        cfg = load_config(TINY, overrides)
        case = f"{engine}:{base}:{cfg.model.dtype}"
        REPLICAS[0] = int(cfg.parallel.replicate) if cfg.parallel.backend == "fsdp" else 1
        MAPPED.clear(), AHEAD.clear(), USED.clear(), MISSED.clear()
        trainer = Trainer(cfg)
        backend = trainer.backend
        # the reference loads whole, as one process without DeepSpeed would (transformers builds every model
        # under zero.Init while a ZeRO-3 model's HfDeepSpeedConfig lives)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        torch.manual_seed(cfg.train.seed)
        reference = apply_lora(load_base(base, DTYPES[cfg.model.dtype]), cfg.lora, base)
        ref_params = {canonical_name(n): p.detach() for n, p in reference.named_parameters()}
        mismatched, checked, copied, mapped_padded = [], 0, [], []
        files = base_files(base)
        module = backend.model.module if hasattr(backend.model, "module") else backend.model
        held, estimated = held_bytes(module), estimated_bytes(trainer.cfg, backend.world_size)
        for name, p in module.named_parameters():
            key = canonical_name(name)
            whole = held_whole(backend, p)
            if whole is not None and not file_backed(whole, files):
                copied.append(key)
            if padded(backend, p) and base_key(key) in MAPPED:  # FSDP2 would copy the map into its padded buffer
                mapped_padded.append(key)
            mine, expected = local_and_expected(backend, key, p, ref_params[key])
            checked += 1
            if mine.dtype != expected.dtype or not torch.equal(mine, expected.reshape(mine.shape)):
                mismatched.append(key)
        buffers = {canonical_name(n): b for n, b in reference.named_buffers()}
        for name, b in module.named_buffers():
            if not torch.equal(b.detach().cpu(), buffers[canonical_name(name)]):
                mismatched.append(canonical_name(name))
        x = (torch.arange(2 * 16).view(2, 16) * 7 % 500).to(trainer.device)
        with torch.no_grad():
            logits = backend.model(input_ids=x).logits.float().cpu()
        if backend.rank == 0:
            with torch.no_grad():
                ref_logits = reference(input_ids=x).logits.float()
            save_file({"sharded": logits.contiguous(), "full": ref_logits.contiguous()}, str(out / f"{i}.logits"))
        report[case] = {
            "checked": checked,
            "mismatched": mismatched,
            "copied": copied,
            "mapped_padded": mapped_padded,
            "padded": sum(padded(backend, p) for p in module.parameters()),
            "sliced": sum(sliced(p) for p in module.parameters()),
            "tied": _tied(module),
            "not_read_ahead": sorted(USED - AHEAD),
            "views_missed": MISSED[:],
            "held_bytes": held,
            "estimated_bytes": estimated,
            "reduce_buckets": reduce_buckets(backend),
        }
        trainer.checkpointer.release_lease()
        del trainer, reference
    (out / f"rank{backend.rank}.json").write_text(json.dumps(report, indent=1))
    shutdown()


def _tied(module) -> bool:
    """Whether the output embedding is the input embedding (GPT-2 ties them)."""
    inner = module.get_base_model() if hasattr(module, "get_base_model") else module
    out, inp = inner.get_output_embeddings(), inner.get_input_embeddings()
    return out is not None and out.weight is inp.weight


if __name__ == "__main__":
    main()
