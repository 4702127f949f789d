"""One rank of the base-loading benchmark (launched by bench/run.py part f with torchrun).

argv[1] is JSON: {"engine": "fsdp"|"zero3", "base": dir, "path": "sharded"|"full"|"transformers", "result": file},
and optionally "dtype" (default float32), "quantization" ("nf4": QLoRA's 4-bit base, as the trainer builds it) and
"targets" (LoRA target modules, default [c_attn]); with "quantization" it also reports the base's bytes on a rank.
The base is loaded the way the trainer loads it ("sharded": FSDP2 on the meta device then each rank reads its rows;
ZeRO-3 partitioned at construction then each rank fills its partition) or the way it did before ("full":
from_pretrained on every rank, then wrap), LoRA applied, the engine wrapped; or, to compare with, the way
transformers' own sharded load does it ("transformers", FSDP2 only: :func:`load_as_transformers`). Each rank reports
its peak resident memory as the kernel counts it (VmHWM, which includes the process's imports), the resident memory
before loading, and the seconds the load took (its imports done before: the engine's and transformers' modeling
code), wall-clock and of this process's CPU time (what a rank on cores of its own would take, where more ranks than
cores share them); rank 0 writes the maximum over ranks. A sharded load also reports where its time went, stage by
stage (:data:`STAGES`), wall-clock and this thread's CPU seconds (the read-ahead thread's excluded), the maximum over
ranks of each.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from transformers import conversion_mapping

from dist_lora.backends import Backend, backend_class, build
from dist_lora.backends import deepspeed as ds_backend
from dist_lora.backends import fsdp as fsdp_backend
from dist_lora.config import LoraConfig, ParallelConfig
from dist_lora.distributed import exit_process, init_distributed, shutdown
from dist_lora.lora import apply_lora, peft_lora_config
from dist_lora.model import adapters_on_cpu, collection_paused, load_base, return_large_blocks_to_the_os
from dist_lora.weights import BaseWeights

STAGES = ("construct", "lora", "engine", "read", "touch")
"""A sharded load's stages: the model built on the meta device (FSDP2) or partitioned at construction (ZeRO-3),
and transformers' table of checkpoint conversions (built once in a process, by ``from_pretrained`` too);
PEFT's LoRA injection; the engine's set-up (``fully_shard``; ``deepspeed.initialize``); dist_lora's own reading of
the base (the files' headers, the read-ahead's start, each rank's rows or partitions read or mapped, the tensors
PEFT derives from the files); and the first touch of every page the rank holds (as the baseline touches its own)."""

SET_UP = STAGES[:3]
"""The stages that are the work of transformers, PEFT and the engine, which ``from_pretrained`` alone does not do
(but for the construction)."""


class Stages:
    """Wall-clock and this thread's CPU seconds per stage; a stage timed inside another counts for itself alone."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._open: list[str] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.thread_time()
        self._open.append(name)
        try:
            yield
        finally:
            self._open.pop()
            spent = (time.perf_counter() - wall, time.thread_time() - cpu)
            self._add(name, spent, 1)
            if self._open:  # not the enclosing stage's time
                self._add(self._open[-1], spent, -1)

    def _add(self, stage: str, spent: tuple[float, float], sign: int) -> None:
        self.seconds[stage] = [total + sign * s for total, s in zip(self.seconds[stage], spent)]

    def timing(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self(name):
                return fn(*args, **kwargs)

        return timed

    def reading(self) -> contextlib.ExitStack:
        """dist_lora's reading of the base, timed as the stage ``read`` wherever it runs; and transformers' table of
        checkpoint conversions, which the first load of a process builds for every architecture it knows (0.04 s
        here; ``from_pretrained`` builds it too, and the reading calls for it first), as ``construct``."""
        stack = contextlib.ExitStack()
        for owner, name, stage in (
            (BaseWeights, "of", "read"),
            (BaseWeights, "read_ahead", "read"),
            (BaseWeights, "follow", "read"),
            (fsdp_backend, "from_files", "read"),
            (fsdp_backend, "materialize", "read"),
            (ds_backend, "_fill_partitions", "read"),
            (conversion_mapping, "_build_checkpoint_conversion_mapping", "construct"),
        ):
            timed = self.timing(stage, getattr(owner, name))
            if owner is BaseWeights and name == "of":  # a classmethod: called on the class, already bound to it
                timed = staticmethod(timed)
            stack.enter_context(mock.patch.object(owner, name, timed))
        return stack


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _max_over_ranks(figures: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The element-wise maximum over ranks (on the collective backend's device: NCCL needs CUDA tensors)."""
    on = figures.to(device)
    dist.all_reduce(on, op=dist.ReduceOp.MAX)
    return on.cpu()


def touch_every_page(model: torch.nn.Module) -> None:
    """Read one element of every page this rank holds, as the from_pretrained baseline does: a tensor that is a
    view of the files' pages (a CPU shard, as from_pretrained's own) is only read when first used."""
    from dist_lora.quantize import is_nf4

    with torch.no_grad():
        for p in model.parameters():
            local = getattr(p, "ds_tensor", None)
            local = local if local is not None else p.to_local() if hasattr(p, "to_local") else p
            if local.numel() and not is_nf4(local) and local.device.type == "cpu":
                float(local.detach().reshape(-1)[:: max(1, 4096 // local.element_size())].sum())


def lora_config(spec: dict) -> LoraConfig:
    """The LoRA every path of the load applies: r=16 on ``spec``'s targets (default ``c_attn``)."""
    return LoraConfig(r=16, alpha=32, target_modules=spec.get("targets", ["c_attn"]))


def load_as_transformers(spec: dict, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' own sharded load, to compare with: ``from_pretrained(distributed_config=DistributedConfig(
    fsdp_size=world))`` (the base built on the meta device, ``fully_shard`` on each layer, each rank's rows read;
    at one rank a plain ``from_pretrained``), then PEFT's LoRA over it, whose parameters stay plain tensors outside
    FSDP2, broadcast from rank 0 as HF's Trainer does before it trains such a model, and the optimizer."""
    import peft
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    base = AutoModelForCausalLM.from_pretrained(
        spec["base"], dtype=dtype, distributed_config=DistributedConfig(fsdp_size=dist.get_world_size())
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft_lora_config(lora_config(spec)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            dist.broadcast(p.data, src=0)
    torch.optim.AdamW(trainable, lr=1e-4)
    return model


def load(
    spec: dict, cls: type, parallel: ParallelConfig, dtype: torch.dtype, device: torch.device, stages: Stages
) -> Backend:
    """The base of ``spec``, loaded the sharded or the full way, LoRA applied (and NF4), the engine wrapped."""
    if spec["path"] == "sharded":
        with stages("construct"):
            base, weights = cls.load_base(parallel, spec["base"], dtype, device, micro_batch_size=1, grad_accum=1)
    else:
        base, weights = load_base(spec["base"], dtype).to(device), None
    torch.manual_seed(0)
    with stages("lora"), adapters_on_cpu():
        model = apply_lora(base, lora_config(spec), spec["base"])
    if spec.get("quantization") == "nf4":
        from dist_lora.quantize import quantize_base

        quantize_base(model, cls.shards(parallel), device)
    with stages("engine"):
        return build(
            parallel,
            model,
            lambda ps: torch.optim.AdamW(ps, lr=1e-4),
            bias="none",
            micro_batch_size=1,
            grad_accum=1,
            weights=weights,
        )


def main() -> None:
    spec = json.loads(sys.argv[1])
    return_large_blocks_to_the_os()  # as the trainer does
    _, world, device = init_distributed(need_group=True)
    engine = spec["engine"]
    parallel = ParallelConfig(backend="fsdp" if engine == "fsdp" else "deepspeed", zero_stage=3)
    cls = backend_class(parallel.backend)
    import peft  # noqa: F401
    import transformers.distributed
    import transformers.modeling_utils  # imports are start-up, not loading (as in the baseline)
    import transformers.models.gpt2.modeling_gpt2
    import transformers.models.llama.modeling_llama  # noqa: F401

    dtype = getattr(torch, spec.get("dtype", "float32"))
    quantization = spec.get("quantization")
    if quantization:
        from dist_lora.quantize import measure, nf4_module

        nf4_module()

    if engine == "zero3":
        from dist_lora.backends.deepspeed import import_deepspeed

        # DeepSpeed's communication set-up is the process group's (accelerate does it at start-up, before any
        # model): it probes DeepSpeed's ops, compiling a test program on the CPU, which zero.Init would otherwise
        # do as the first thing of the load
        import_deepspeed().init_distributed()
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401 - initialize imports it (and torch._dynamo)
    before = status_kb("VmRSS")
    dist.barrier()
    stages = Stages()
    t0, cpu0 = time.perf_counter(), time.process_time()
    with collection_paused(), stages.reading():  # as the trainer builds (every path)
        if spec["path"] == "transformers":
            model = load_as_transformers(spec, dtype)
        else:
            model = load(spec, cls, parallel, dtype, device, stages).model
    with stages("touch"):
        touch_every_page(model)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    footprint = measure(model) if quantization else None
    base_bytes = footprint.nf4_bytes + footprint.other_bytes if footprint else 0
    cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    figures = [status_kb("VmHWM"), before, seconds, base_bytes, status_kb("VmRSS"), cuda_peak, cpu_seconds]
    figures += [s for stage in STAGES for s in stages.seconds[stage]]
    figures += [sum(stages.seconds[stage][i] for stage in SET_UP) for i in (0, 1)]  # a rank's own sum
    figures = torch.tensor(figures, dtype=torch.float64)
    figures = _max_over_ranks(figures, device)
    if dist.get_rank() == 0:
        peak, rss_before, load_s, base_bytes, rss_after, cuda_peak, cpu_s, *spent, set_up, set_up_cpu = figures.tolist()
        result = {"world": world, "peak_rss": peak, "rss_before": rss_before, "load_s": load_s, "load_cpu_s": cpu_s}
        if spec["path"] == "sharded":
            result["stages"] = {stage: spent[2 * i : 2 * i + 2] for i, stage in enumerate(STAGES)}
            result["set_up"] = [set_up, set_up_cpu]
            result["conversion_table_in"] = "construct"  # (rows measured before it counted the table as read)
        if torch.cuda.is_available():
            result["cuda_peak"] = cuda_peak
        if footprint is not None:
            result.update(base_bytes_per_rank=base_bytes, rss_after=rss_after, bits=footprint.bits_per_weight)
        Path(spec["result"]).write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main()
    exit_process()  # not through finalization, where gloo's threads can abort a rank that finished
