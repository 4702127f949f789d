"""One rank of a save benchmark (launched by bench/run.py with torchrun). Writes rank 0's figures as JSON.

argv[1] is JSON: {"engine": "zero3"|"fsdp", "layers", "hidden", "heads", "r", "targets", "methods", "repeats",
"out"}. The model is a randomly initialised GPT-2 of the given size (sizes are what matter), LoRA from PEFT, one
training step taken so that Adam state exists. Each method saves ``repeats`` times; the figures are medians.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dist_lora.backends import build
from dist_lora.checkpointer import Checkpointer
from dist_lora.config import CheckpointConfig, LoraConfig, ParallelConfig
from dist_lora.distributed import exit_process, init_distributed, shutdown
from dist_lora.gather import COMM_STATS
from dist_lora.lora import adapter_parameters, apply_lora, full_shape

PAGE = os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every millisecond while active; reports the peak increase."""

    def __init__(self) -> None:
        self.base = self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def dir_stats(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def build_backend(spec: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=spec["layers"],
        n_embd=spec["hidden"],
        n_head=spec["heads"],
        vocab_size=50257,
        n_positions=1024,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model = apply_lora(model, LoraConfig(r=spec["r"], alpha=2 * spec["r"], target_modules=spec["targets"]))
    engine = spec["engine"]
    parallel = ParallelConfig(
        backend="deepspeed" if engine.startswith("zero") else engine,
        zero_stage=int(engine[-1]) if engine.startswith("zero") else 3,
    )
    backend = build(
        parallel, model, lambda ps: torch.optim.AdamW(ps, lr=1e-4), bias="none", micro_batch_size=1, grad_accum=1
    )
    x = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(dist.get_rank()))
    loss = backend.forward({"input_ids": x, "labels": x})
    backend.backward(loss, grad_accum=1, last_micro=True)
    backend.step(1e-4)
    return backend


def train_step(backend, seq_len: int = 8) -> None:
    """One training step (forward, backward, optimizer step) on a short random sequence."""
    x = torch.randint(0, 50257, (1, seq_len), generator=torch.Generator().manual_seed(dist.get_rank()))
    loss = backend.forward({"input_ids": x, "labels": x})
    backend.backward(loss, grad_accum=1, last_micro=True)
    backend.step(1e-4)


def method_dist_lora(backend, out: Path | str, async_save: bool, storage_options: dict | None = None):
    """A dist_lora save. Asynchronous: the save is followed by what follows it in training, the next step's
    forward and backward (which overlap the background snapshot) and its optimizer step (which waits for the
    snapshot if it is not taken yet); the stall is the save call plus that wait."""
    ck = Checkpointer(
        CheckpointConfig(dir=str(out), async_save=async_save, storage_options=dict(storage_options or {}))
    )

    def run(i: int, train: bool = True) -> dict:
        COMM_STATS.clear()
        ck.save(backend, step=i + 1)
        if async_save and train:
            train_step(backend)
        ck.wait()
        stats = ck.history[-1]
        # rank 0 receives its gather input's size from every other rank; small all-reduce/broadcast added as sent
        world = dist.get_world_size()
        sent = COMM_STATS.bytes
        moved = sent["gather"] * (world - 1) + sent["all_reduce"] + sent["broadcast"]
        row = {"stall_s": stats.stall_s, "total_s": stats.done_s, "bytes_moved": moved}
        if async_save:
            row["snapshot_s"] = stats.snapshot_s
        return row

    return run


def method_first_async_save(backend, out: Path):
    """The FIRST asynchronous save of a fresh Checkpointer (made and prepared at the run's start, outside the timing,
    as the trainer does): does it stall like the later ones, or pay for one-time set-up (the background group, the
    adapter layout, the base fingerprint)?"""

    def run(i: int, train: bool = True) -> dict:
        ck = Checkpointer(CheckpointConfig(dir=str(out / f"run-{i}"), async_save=True))
        ck.prepare(backend)  # as the trainer does at start
        ck.save(backend, step=1)
        if train:
            train_step(backend)
        ck.wait()
        stats = ck.history[-1]
        return {"stall_s": stats.stall_s, "total_s": stats.done_s, "snapshot_s": stats.snapshot_s}

    return run


def method_save_checkpoint_api(backend, out: Path):
    """The public ``dist_lora.save_checkpoint(model, dir, step=, optimizer=)`` called every N steps by a user's
    own loop (synchronous, as documented): its cost per call, against the trainer's Checkpointer ("dist_lora sync")."""
    from dist_lora.api import save_checkpoint

    model, optimizer = backend.model, backend.optimizer

    def run(i: int) -> dict:
        t0 = time.perf_counter()
        save_checkpoint(model, str(out), step=i + 2, optimizer=optimizer)
        total = time.perf_counter() - t0
        return {"stall_s": total, "total_s": total}

    return run


def method_zero3_consolidated(backend, out: Path):
    """HF Trainer / accelerate's path under ZeRO-3: consolidate the whole model in 16 bit, keep the LoRA keys."""
    from safetensors.torch import save_file

    engine = backend.model
    keep = {k.removeprefix("base_model.model.") for k in adapter_parameters(engine.module, "none")}

    def run(i: int) -> dict:
        t0 = time.perf_counter()
        full = engine._zero3_consolidated_16bit_state_dict()
        if dist.get_rank() == 0:
            lora = {k: v for k, v in full.items() if "lora_" in k}
            assert lora, "no LoRA keys in the consolidated state dict"
            save_file({k: v.contiguous() for k, v in lora.items()}, str(out / f"adapter-{i}.safetensors"))
        del full
        dist.barrier()
        total = time.perf_counter() - t0
        return {"stall_s": total, "total_s": total, "n_keys": len(keep)}

    return run


def method_ds_save_checkpoint(backend, out: Path):
    """DeepSpeed's own checkpoint without frozen params: per-rank files, bound to the world size that wrote them."""
    engine = backend.model

    def run(i: int) -> dict:
        t0 = time.perf_counter()
        engine.save_checkpoint(str(out), tag=f"s{i}", exclude_frozen_parameters=True)
        dist.barrier()
        total = time.perf_counter() - t0
        return {"stall_s": total, "total_s": total}

    return run


def method_fsdp_full_state_dict(backend, out: Path):
    """FSDP2's full state dict (all of the model to rank 0's CPU), then keep the LoRA keys."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = backend.model

    def run(i: int) -> dict:
        t0 = time.perf_counter()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            lora = {k: v.contiguous() for k, v in full.items() if "lora_" in k}
            save_file(lora, str(out / f"adapter-{i}.safetensors"))
        del full
        dist.barrier()
        total = time.perf_counter() - t0
        return {"stall_s": total, "total_s": total}

    return run


def method_dcp_adapter(backend, out: Path):
    """torch.distributed.checkpoint of the adapter tensors and their optimizer state (sharded files)."""
    import torch.distributed.checkpoint as dcp

    params = adapter_parameters(backend.model, "none")

    def run(i: int) -> dict:
        t0 = time.perf_counter()
        state = {
            "model": dict(params.items()),
            "optim": {
                k: {n: t for n, t in backend.optimizer.state[p].items() if n != "step"} for k, p in params.items()
            },
        }
        dcp.save(state, checkpoint_id=str(out / f"dcp-{i}"))
        dist.barrier()
        total = time.perf_counter() - t0
        return {"stall_s": total, "total_s": total}

    return run


def s3_target(spec: dict, out: Path) -> dict:
    s3 = spec["s3"]
    options = {k: s3[k] for k in ("endpoint_url", "key", "secret")}
    return {"out": f"s3://{s3['bucket']}/bench/{out.name}", "storage_options": options}


METHODS = {
    "dist_lora sync": lambda b, o, s: method_dist_lora(b, o, async_save=False),
    "dist_lora async": lambda b, o, s: method_dist_lora(b, o, async_save=True),
    "dist_lora sync to S3": lambda b, o, s: method_dist_lora(b, **s3_target(s, o), async_save=False),
    "dist_lora async to S3": lambda b, o, s: method_dist_lora(b, **s3_target(s, o), async_save=True),
    "dist_lora async, first save of a run": lambda b, o, s: method_first_async_save(b, o),
    "dist_lora.save_checkpoint() per call": lambda b, o, s: method_save_checkpoint_api(b, o),
    "DeepSpeed ZeRO-3 16-bit consolidation (HF Trainer path)": lambda b, o, s: method_zero3_consolidated(b, o),
    "DeepSpeed save_checkpoint(exclude_frozen_parameters=True)": lambda b, o, s: method_ds_save_checkpoint(b, o),
    "FSDP2 get_model_state_dict(full_state_dict) (accelerate path)": lambda b, o, s: method_fsdp_full_state_dict(b, o),
    "torch.distributed.checkpoint.save of the adapter": lambda b, o, s: method_dcp_adapter(b, o),
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    init_distributed(need_group=True)
    rank = dist.get_rank()
    out_root = Path(spec["out"])
    backend = build_backend(spec)
    n_base = sum(math.prod(full_shape(p)) for p in backend.model.parameters())
    results = []
    for name in spec["methods"]:
        work = out_root / f"work-{abs(hash(name)) % 10**8}"
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        dist.barrier()
        run = METHODS[name](backend, work, spec)
        run(-1)  # warm-up (first-call allocations, lazily built state)
        if rank == 0:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        dist.barrier()
        # timed runs alone: a memory-sampling thread would compete for the GIL with a background writer
        rows = [run(i) for i in range(spec["repeats"])]
        with PeakRSS() as mem:  # the save alone: no training step's activations in the figure
            run(spec["repeats"], **({"train": False} if name.startswith("dist_lora async") else {}))
        dist.barrier()
        if rank == 0:
            nbytes, nfiles = dir_stats(work)
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], (int, float))}
            local = "S3" not in name
            results.append(
                {
                    "method": name,
                    "engine": spec["engine"],
                    **med,
                    "rank0_extra_bytes": mem.extra,
                    "bytes_written": nbytes // (spec["repeats"] + 1) if local else None,
                    "files": nfiles // (spec["repeats"] + 1) if local else None,
                }
            )
            shutil.rmtree(work, ignore_errors=True)
        dist.barrier()
    if rank == 0:
        adapter = sum(math.prod(full_shape(p)) for p in adapter_parameters(backend.model, "none").values())
        result = {"spec": spec, "adapter_elements": adapter, "base_elements": n_base, "results": results}
        Path(spec["result"]).write_text(json.dumps(result, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
    exit_process()  # not through finalization, where gloo's threads can abort a rank that finished
