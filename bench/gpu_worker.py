"""One rank of the CUDA validation (bench/gpu.py): the trainer's real paths on whatever device this rank has.

argv[1] is JSON: {"out": dir, "data": corpus, "checks": [{"engine", "base"}], "runs": [{"name", "base", "seq_len",
"steps"}]}. Rank 0 writes out/worker.json.

checks: per engine (FSDP2, ZeRO-3, FSDP2 with its shards in host memory), bf16 mixed precision: train 2 steps;
save that step synchronously (the reference) and asynchronously (pinned staging and a side stream on a GPU), train
on at once; the asynchronous step's adapter and optimizer files must equal the reference's byte for byte; then a
fresh trainer resumes the step and saves it again: equal again. Each check says whether every shard lives in host
memory.
runs: a base loaded the sharded way (FSDP2, bf16 mixed precision; "dtype" sets model.dtype), LoRA r=16 on
q/k/v/o: load seconds, peak device memory, step seconds, the save stall, and the resume; "engine" (default "fsdp")
names another of ENGINES, for the step time of FSDP2 against DDP on the same base. A run with "quantization":
"nf4" is QLoRA over the same base (model.dtype bfloat16, LoRA on every linear layer), paired with an unquantized run
of the same settings ("quantization": "none"): both report the frozen base's bytes on the device. A run with
"root_holds_ends" leaves the base's input embedding and lm_head in FSDP2's root group (dist_lora's layout before
they had groups of their own), for the device memory their own groups save. Each run but that one also reports what
``dist-lora check`` says the device holds for its config (the model state; and with what the engine holds gathered
for compute), computed on the meta device before the run, beside what the device had allocated as the optimizer
stepped the adapter (the most over the steps; on a CPU, nothing to compare).

A part that raises is recorded in "errors" (its traceback goes to the output) and the others still run: a GPU lease
is short, and one fault should not cost the figures of the rest. worker.json is rewritten after every part.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

import dist_lora.backends.fsdp
from dist_lora.check import check_run, device_bytes
from dist_lora.checkpointer import Checkpointer
from dist_lora.config import CheckpointConfig, load_config
from dist_lora.constants import ADAPTER_WEIGHTS_NAME, OPTIMIZER_NAME
from dist_lora.distributed import exit_process, shutdown
from dist_lora.quantize import measure
from dist_lora.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "fsdp": ["parallel.backend=fsdp"],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
    # runs only: the step time of FSDP2 against DDP on the same base (issue #14)
    "fsdp-no-reshard": ["parallel.backend=fsdp", "parallel.reshard_after_forward=false"],
    "fsdp-keep": ["parallel.backend=fsdp", "parallel.keep_base_gathered=true"],
    "ddp": ["parallel.backend=ddp"],
    # a check and a run: the shards, their gradients and Adam state in host memory (parallel.cpu_offload)
    "fsdp-offload": ["parallel.backend=fsdp", "parallel.cpu_offload=true"],
}


def overrides(base: str, data: str, ckpt: Path, *extra: str, seq_len: int = 64) -> list[str]:
    return [
        f"model.name_or_path={base}",
        f"data.path={data}",
        f"data.seq_len={seq_len}",
        "lora.r=16",
        "lora.alpha=32",
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
        "train.global_batch_size=2",
        "train.micro_batch_size=1",
        "train.max_steps=20",
        "train.lr=1e-3",
        "parallel.mixed_precision=bf16",
        f"checkpoint.dir={ckpt}",
        "checkpoint.resume=none",
        *extra,
    ]


def device_peak() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in (ADAPTER_WEIGHTS_NAME, OPTIMIZER_NAME))


def check(engine: str, base: str, data: str, out: Path) -> dict[str, Any]:
    root = out / f"check-{engine}"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides(base, data, root / "async", *ENGINES[engine]))
    trainer = Trainer(cfg)
    for _ in range(2):
        trainer.train_step()
    reference = Checkpointer(CheckpointConfig(dir=str(root / "sync"), async_save=False))
    reference.save(trainer.backend, step=2)
    url = trainer.save()  # asynchronous
    trainer.train_step()  # the snapshot overlaps this step's forward and backward; its optimizer step waits for it
    trainer.close()
    stats = trainer.checkpointer.history[-1]
    staging = trainer.checkpointer._staging._buffer
    pinned = bool(staging is not None and staging.is_pinned())
    shards = [p.to_local() for p in trainer.backend.model.parameters() if isinstance(p, DTensor)]
    on_host = bool(shards) and all(t.device.type == "cpu" for t in shards)
    step = "step-00000002"
    equal = same_files(root / "async" / step, root / "sync" / step)
    trainer.checkpointer.release_lease()
    resumed = Trainer(
        load_config(
            ROOT / "configs" / "tiny.yaml",
            overrides(base, data, root / "resumed", *ENGINES[engine], f"checkpoint.resume={url}"),
        )
    )
    resumed.resume(url)
    again = Checkpointer(CheckpointConfig(dir=str(root / "again"), async_save=False))
    again.save(resumed.backend, step=2)
    resumed.checkpointer.release_lease()
    return {
        "engine": engine,
        "device": str(trainer.device),
        "async_equals_sync": equal,
        "resumed_equals_saved": same_files(root / "again" / step, root / "sync" / step),
        "staging_pinned": pinned,
        "shards_on_host": on_host,
        "stall_s": stats.stall_s,
        "snapshot_s": stats.snapshot_s,
        "total_s": stats.done_s,
    }


def _layout(spec: dict[str, Any]) -> contextlib.AbstractContextManager[Any]:
    """The FSDP2 layout a run builds: with "root_holds_ends", the embedding and lm_head left in the root's group."""
    if not spec.get("root_holds_ends"):
        return contextlib.nullcontext()
    from unittest import mock

    return mock.patch.object(dist_lora.backends.fsdp, "_embedding_groups", return_value=[])


def run(spec: dict[str, Any], data: str, out: Path) -> dict[str, Any]:
    root = out / f"run-{spec['name']}"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    quantization = spec.get("quantization")
    qlora = (
        [f"model.quantization={quantization}", "model.dtype=bfloat16", "lora.target_modules=all-linear"]
        if quantization
        else []
    )
    if spec.get("dtype"):
        qlora.append(f"model.dtype={spec['dtype']}")
    if "loss_chunk_tokens" in spec:
        qlora.append(f"train.loss_chunk_tokens={spec['loss_chunk_tokens']}")
    if spec.get("compile"):
        qlora.append("train.compile=true")
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        overrides(
            spec["base"], data, root / "ck", *ENGINES[spec.get("engine", "fsdp")], *qlora, seq_len=spec["seq_len"]
        ),
    )
    checked = None if spec.get("root_holds_ends") else check_run(cfg, world=1, data=False)  # (the meta device)
    t0 = time.perf_counter()
    with _layout(spec):
        trainer = Trainer(cfg)
    load_s = time.perf_counter() - t0
    load_peak = device_peak()
    # what the load leaves allocated besides the shards, and the steps' own peak from there (the peak is reset
    # here; the run's peak, the table's "device peak training", is the larger of the two)
    load_allocated = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    footprint = measure(trainer.backend.model)
    steps, at_step = [], []
    allocated = register_optimizer_step_pre_hook(
        lambda *args: at_step.append(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None
    )
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        losses = trainer.train_step()
        steps.append(time.perf_counter() - t)
    allocated.remove()
    url = trainer.save()
    trainer.train_step()  # the step that overlaps the background snapshot
    trainer.close()
    steps_peak = device_peak()
    train_peak = max(steps_peak, load_peak) if steps_peak is not None and load_peak is not None else None
    stats = trainer.checkpointer.history[-1]
    trainer.checkpointer.release_lease()
    del trainer
    free_device_memory()
    t0 = time.perf_counter()
    with _layout(spec):
        resumed = Trainer(cfg)
    resumed.resume(url)
    resume_loss = resumed.train_step()
    resume_s = time.perf_counter() - t0
    resumed.checkpointer.release_lease()
    return {
        "name": spec["name"],
        "base": spec["base"],
        "engine": spec.get("engine", "fsdp"),
        "dtype": spec.get("dtype"),
        "loss_chunk_tokens": spec.get("loss_chunk_tokens"),
        "compile": bool(spec.get("compile")),
        "root_holds_ends": bool(spec.get("root_holds_ends")),
        "first_step_s": steps[0],
        "load_s": load_s,
        "load_peak_device_bytes": load_peak,
        "train_peak_device_bytes": train_peak,
        "load_allocated_device_bytes": load_allocated,
        "steps_peak_device_bytes": steps_peak,
        "resume_peak_device_bytes": device_peak(),
        "step_s": statistics.median(steps[1:] or steps),
        "tokens_per_s": 2 * spec["seq_len"] / statistics.median(steps[1:] or steps),
        "last_loss": losses,
        "save_stall_s": stats.stall_s,
        "snapshot_s": stats.snapshot_s,
        "save_total_s": stats.done_s,
        "resume_s": resume_s,
        "resume_loss": resume_loss,
        "quantization": quantization,
        "base_bytes": footprint.nf4_bytes + footprint.other_bytes,
        "bits_per_linear_weight": footprint.bits_per_weight if footprint.nf4_weights else None,
        "check_state_device_bytes": checked and device_bytes(checked) - checked.gathered_bytes_per_rank,
        "check_device_bytes": checked and device_bytes(checked),
        "allocated_at_step_device_bytes": max(at_step, default=None),
    }


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = Path(spec["out"])
    results: dict[str, Any] = {"checks": [], "runs": [], "errors": []}
    rank0 = int(os.environ.get("RANK", "0")) == 0

    def part(kind: str, name: str, measure: Callable[[], dict[str, Any]]) -> None:
        print(f"[gpu_worker] {kind} {name}", flush=True)
        try:
            results[kind].append(measure())
        except Exception as e:
            traceback.print_exc()
            results["errors"].append({"part": f"{kind} {name}", "error": f"{type(e).__name__}: {e}"})
        free_device_memory()
        if rank0:
            (out / "worker.json").write_text(json.dumps(results, indent=1))

    for c in spec["checks"]:
        part("checks", c["engine"], functools.partial(check, c["engine"], c["base"], spec["data"], out))
    for r in spec["runs"]:
        part("runs", r["name"], functools.partial(run, r, spec["data"], out))
    shutdown()


if __name__ == "__main__":
    main()
    exit_process()  # not through finalization, where gloo's threads can abort a rank that finished
