"""One rank of the base-loading benchmark (launched by bench/run.py part f with torchrun).

argv[1] is JSON: {"engine": "fsdp"|"zero3", "base": dir, "path": "sharded"|"full", "result": file}. The base is
loaded the way the trainer loads it ("sharded": FSDP2 on the meta device then each rank reads its rows; ZeRO-3
partitioned at construction then each rank fills its partition) or the way it did before ("full": from_pretrained
on every rank, then wrap), LoRA applied, the engine wrapped. Each rank reports its peak resident memory as the
kernel counts it (VmHWM, which includes the process's imports), the resident memory before loading, and the
seconds the load took (its imports done before: the engine's and transformers' modeling code); rank 0 writes the
maximum over ranks.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dist_lora.backends import backend_class, build
from dist_lora.config import LoraConfig, ParallelConfig
from dist_lora.distributed import init_distributed, shutdown
from dist_lora.lora import apply_lora
from dist_lora.model import adapters_on_cpu, load_base, return_large_blocks_to_the_os


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    spec = json.loads(sys.argv[1])
    return_large_blocks_to_the_os()  # as the trainer does
    _, world, device = init_distributed(need_group=True)
    engine = spec["engine"]
    parallel = ParallelConfig(backend="fsdp" if engine == "fsdp" else "deepspeed", zero_stage=3)
    cls = backend_class(parallel.backend)
    import transformers.modeling_utils  # imports are start-up, not loading (as in the baseline)
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401

    if engine == "zero3":
        from dist_lora.backends.deepspeed import import_deepspeed

        import_deepspeed()
    before = status_kb("VmRSS")
    dist.barrier()
    t0 = time.perf_counter()
    if spec["path"] == "sharded":
        base, weights = cls.load_base(parallel, spec["base"], torch.float32, device, micro_batch_size=1, grad_accum=1)
    else:
        base, weights = load_base(spec["base"], torch.float32).to(device), None
    torch.manual_seed(0)
    with adapters_on_cpu():
        model = apply_lora(base, LoraConfig(r=16, alpha=32, target_modules=["c_attn"]), spec["base"])
    build(
        parallel,
        model,
        lambda ps: torch.optim.AdamW(ps, lr=1e-4),
        bias="none",
        micro_batch_size=1,
        grad_accum=1,
        weights=weights,
    )
    seconds = time.perf_counter() - t0
    figures = torch.tensor([status_kb("VmHWM"), before, seconds], dtype=torch.float64)
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        peak, rss_before, load_s = figures.tolist()
        Path(spec["result"]).write_text(
            json.dumps({"world": world, "peak_rss": peak, "rss_before": rss_before, "load_s": load_s})
        )
    shutdown()


if __name__ == "__main__":
    main()
