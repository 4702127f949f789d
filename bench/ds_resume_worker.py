"""Can DeepSpeed's own checkpoint (exclude_frozen_parameters=True) be loaded at another world size?

argv[1] JSON: {"mode": "save"|"load", "dir", "result", "stage"}. Saves at the launch's world size, or tries
``engine.load_checkpoint`` and records what happened (rank 0 writes the JSON).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from bench.save_worker import build_backend
from dist_lora.distributed import exit_process, init_distributed, shutdown


def main() -> None:
    spec = json.loads(sys.argv[1])
    init_distributed(need_group=True)
    backend = build_backend(
        {"engine": f"zero{spec['stage']}", "layers": 2, "hidden": 64, "heads": 4, "r": 4, "targets": ["c_attn"]}
    )
    engine = backend.model
    outcome: dict = {"world_size": dist.get_world_size(), "mode": spec["mode"]}
    if spec["mode"] == "save":
        engine.save_checkpoint(spec["dir"], tag="ds", exclude_frozen_parameters=True)
        outcome["ok"] = True
    else:
        try:
            engine.load_checkpoint(spec["dir"], tag="ds", load_module_strict=False)
            outcome["ok"] = True
            x = torch.randint(0, 100, (1, 16))
            loss = backend.forward({"input_ids": x, "labels": x})
            outcome["loss_after_load"] = float(loss)
        except Exception as e:
            outcome["ok"] = False
            outcome["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            outcome["where"] = traceback.format_exc().splitlines()[-3][:200]
    if dist.get_rank() == 0:
        Path(spec["result"]).write_text(json.dumps(outcome, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
    exit_process()  # not through finalization, where gloo's threads can abort a rank that finished
