"""One rank of bench part n: a training step's peak resident memory under FSDP2 with the base's input embedding and
``lm_head`` in FSDP groups of their own (dist_lora's layout), or left in the root's group (``root_holds_ends``: what
FSDP2 does with modules no ``fully_shard`` call names, and dist_lora's layout before), on a base whose two ends are
large. After one warm-up step the kernel's high-water mark is reset (``/proc/self/clear_refs``), then the timed
steps run; rank 0 writes, the largest over ranks, {"settled": VmRSS at the reset, "peak": VmHWM after the steps,
"groups": FSDP2's groups, "cuda_peak": on a GPU, the device's peak over those steps} to spec["result"].

    torchrun --nproc-per-node 2 -m bench.gathered_worker '{"config": ..., "overrides": [...], ...}'
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

from bench.load_worker import status_kb as status_bytes  # (in bytes, despite its name)
from bench.throughput_worker import max_over_ranks


def main() -> None:
    from torch.distributed.fsdp import FSDPModule

    import dist_lora.backends.fsdp as fsdp
    from dist_lora.config import load_config
    from dist_lora.train import Trainer

    spec = json.loads(sys.argv[1])
    root_holds = mock.patch.object(fsdp, "_embedding_groups", return_value=[])
    with root_holds if spec["root_holds_ends"] else contextlib.nullcontext():
        trainer = Trainer(load_config(spec["config"], spec["overrides"]))
    trainer.train_step()  # the first step's one-time allocations
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    settled = status_bytes("VmRSS")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec["steps"]):
        trainer.train_step()
    figures = {
        "settled": settled,
        "peak": status_bytes("VmHWM"),
        "groups": len({id(m._get_fsdp_state()) for m in trainer.backend.model.modules() if isinstance(m, FSDPModule)}),
        "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
    }
    figures = {key: max_over_ranks(value) for key, value in figures.items()}
    trainer.checkpointer.release_lease()
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(figures))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
