"""One rank of the on_error=raise fault matrix (tests/test_agree.py): many injected failures in one 2-rank launch.

argv[1] is JSON: {"overrides": [...], "out": dir, "s3": {"url": prefix, "options": {...}} | null}. The model is
built once; then every case gets a fresh Checkpointer (``on_error: raise``) over its own checkpoint dir, an
injected failure (``DIST_LORA_FAILPOINT`` set for that case alone, or a real fault: a corrupt file, a wrong S3
secret) and one operation: a save (sync or async), taking the lease, or loading a step. Each rank records what it
raised (class and message, or nothing) and, on rank 0, which steps of the dir are committed and verify. Every case
must leave the ranks in step: the next case's collectives run only if the last one was agreed.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from dist_lora import faults
from dist_lora.api import load_checkpoint
from dist_lora.checkpoint import list_steps, read_step
from dist_lora.checkpointer import Checkpointer
from dist_lora.config import CheckpointConfig, load_config
from dist_lora.constants import ENV_FAILPOINT
from dist_lora.distributed import shutdown
from dist_lora.storage import Storage
from dist_lora.train import Trainer
from tests.dist_utils import TINY

SAVE_POINTS = [  # (failpoint spec, what the save must end in): a save fails, or it commits with a warning
    ("save.prepare@rank1", "raise"),
    ("save.meta@rank0", "raise"),
    ("save.serialize@rank0", "raise"),
    ("write.before:adapter_model.safetensors@rank0", "raise"),
    ("write.before:optimizer.safetensors@rank0", "raise"),
    ("commit.before_manifest@rank0", "raise"),
    ("commit.latest@rank0", "commit"),
    ("retention.after_manifest_delete@rank0", "commit"),
]
S3_POINTS = [("write.before:adapter_model.safetensors@rank0", "raise"), ("commit.before_manifest@rank0", "raise")]


def cases(s3: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for mode in ("sync", "async"):
        for spec, expect in SAVE_POINTS:
            out.append({"op": "save", "mode": mode, "spec": spec, "expect": expect, "storage": "local"})
        if s3 is not None:
            for spec, expect in S3_POINTS:
                out.append({"op": "save", "mode": mode, "spec": spec, "expect": expect, "storage": "s3"})
            out.append({"op": "save", "mode": mode, "spec": "wrong-secret", "expect": "raise", "storage": "s3"})
    out.append({"op": "lease", "mode": "sync", "spec": "lease.acquire@rank0", "expect": "raise", "storage": "local"})
    out.append({"op": "load", "mode": "sync", "spec": "load.read@rank0", "expect": "raise", "storage": "local"})
    out.append({"op": "load", "mode": "sync", "spec": "corrupt-file", "expect": "raise", "storage": "local"})
    if s3 is not None:
        out.append({"op": "load", "mode": "sync", "spec": "load.read@rank0", "expect": "raise", "storage": "s3"})
    return out


def case_id(case: dict[str, Any]) -> str:
    return f"{case['op']}-{case['mode']}-{case['storage']}-{case['spec']}"


def main() -> None:
    args = json.loads(sys.argv[1])
    out, s3 = Path(args["out"]), args.get("s3")
    trainer = Trainer(load_config(TINY, args["overrides"]))
    trainer.train_step()  # Adam state exists: saves carry it
    rank, backend = trainer.rank, trainer.backend
    results: dict[str, Any] = {}
    for n, case in enumerate(cases(s3)):
        if case["storage"] == "s3":
            assert s3 is not None
            url, options = f"{s3['url']}/case{n}", dict(s3["options"])
        else:
            url, options = str(out / f"case{n}"), {}
        config = CheckpointConfig(
            dir=url,
            storage_options=options,
            async_save=case["mode"] == "async",
            on_error="raise",
            keep_last=1,
            retry_attempts=1,
        )
        spec = case["spec"]
        if case["op"] == "load" or spec.startswith("retention."):  # a committed step to load, or to retire
            first = Checkpointer(config)
            first.save(backend, step=1)
            first.wait()  # (its own: an async save of step 1 still in flight would race the case's step 2)
            if spec == "corrupt-file" and rank == 0:
                path = out / f"case{n}" / "step-00000001" / "adapter_model.safetensors"
                data = bytearray(path.read_bytes())
                data[-1] ^= 0xFF  # same size, other bytes: only the sha256 can tell
                path.write_bytes(bytes(data))
        if spec == "wrong-secret":
            config = replace(config, storage_options={**options, "secret": "not-the-secret"})
        os.environ[ENV_FAILPOINT] = f"{spec}=raise" if "@rank" in spec else ""
        faults._passes.clear()
        error: BaseException | None = None
        try:
            checkpointer = Checkpointer(config)
            if case["op"] == "save":
                checkpointer.save(backend, step=2)
                checkpointer.wait()
            elif case["op"] == "lease":
                checkpointer.take_lease()
                checkpointer.release_lease()
            else:
                step_url = f"{url}/step-00000001"  # the step itself: a dir would skip a step that fails its check
                load_checkpoint(backend.model, step_url, optimizer=backend.optimizer, backend=backend)
        except Exception as e:
            error = e
        os.environ[ENV_FAILPOINT] = ""
        result: dict[str, Any] = {
            "case": case,
            "error": None if error is None else [type(error).__name__, str(error)],
            "agreed": bool(getattr(error, "agreed", False)),
        }
        if rank == 0:
            storage = Storage(url, options)
            committed = [s.step for s in list_steps(storage) if s.status == "committed"]
            for step in committed:
                read_step(storage.child(f"step-{step:08d}"))  # every sha256 checks
            result["committed"] = committed
        results[case_id(case)] = result
    (out / f"results-rank{rank}.json").write_text(json.dumps(results, indent=1))
    trainer.close()
    shutdown()


if __name__ == "__main__":
    main()
