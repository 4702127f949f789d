"""One rank of the trainable-state test (tests/test_check.py): what each engine holds of the adapter at its optimizer
step, against what ``dist-lora check`` says for the same config at this world size.

argv[1] is JSON: {"runs": [{"name", "overrides": [...]}], "out": dir}. Each run builds a Trainer (the tiny config
plus its overrides) and takes two steps (AdamW makes its moments at the first). As the optimizer that steps the
adapter starts the second step, every floating-point tensor storage alive in the process is summed, less the
frozen base's (its parameters, shards or partitions, and its buffers) and those alive before the engine was built
(the data's; held until the measure, so that no new tensor can take an address of theirs): what is left is the
adapter's state as the engine allocated it, ZeRO's flat groups, fp32 partitions and reduction buckets included.
Likewise the frozen base's storages after the steps (a ZeRO-3 tensor under the persistence threshold is gathered
whole at the first forward). Under ZeRO-Offload each figure is also split: what is in host memory is what DeepSpeed
pins as it places it (:class:`Pinned`) and the optimizer it steps on the host; a frozen ZeRO-3 partition, one it
pinned. Rank r writes out/rank{r}.json: per run, each figure and the check's, [all of it, in host memory].
"""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor

import dist_lora.backends as backends
from dist_lora.check import (
    build_meta_model,
    frozen_bytes,
    frozen_host_bytes,
    layout,
    trainable_host_bytes,
    trainable_state_bytes,
)
from dist_lora.config import load_config
from dist_lora.distributed import shutdown
from dist_lora.train import Trainer, adamw
from tests.dist_utils import TINY


def storages() -> dict[int, torch.UntypedStorage]:
    """Every floating-point tensor storage alive (reachable from Python), by address."""
    found = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.is_floating_point() and o.device.type != "meta":
            if isinstance(o, DTensor):  # a wrapper: its local tensor is found on its own
                continue
            if isinstance(o, FakeTensor):  # left by a torch.compile in the process these ranks forked from: no memory
                continue
            storage = o.untyped_storage()
            if storage.nbytes():
                found[storage.data_ptr()] = storage
    return found


def frozen_storages(module: torch.nn.Module) -> set[int]:
    """The frozen base's storages: each parameter's own, FSDP2's local shard, ZeRO-3's partition; every buffer."""
    found = set()
    for p in module.parameters():
        if p.requires_grad:
            continue
        for t in (p.to_local() if isinstance(p, DTensor) else p, getattr(p, "ds_tensor", None)):
            if t is not None and t.untyped_storage().nbytes():
                found.add(t.untyped_storage().data_ptr())
    found.update(b.untyped_storage().data_ptr() for b in module.buffers())
    return found


class Pinned:
    """The storages DeepSpeed pins (``get_accelerator().pin_memory``): what it puts in host memory under its
    offload, found as it places them, not by where they are (on this CPU every tensor is in host memory). Each is
    held, so that no later tensor takes the address of one freed."""

    def __init__(self) -> None:
        from deepspeed.accelerator import get_accelerator

        self.accelerator = get_accelerator()
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.tensors: list[weakref.ref[torch.Tensor]] = []  # (a ZeRO-3 partition the load then maps onto the files)
        pin = self.accelerator.pin_memory

        def pinning(tensor, *args, **kwargs):
            pinned = pin(tensor, *args, **kwargs)
            self.storages[pinned.untyped_storage().data_ptr()] = pinned.untyped_storage()
            self.tensors.append(weakref.ref(pinned))
            return pinned

        self.accelerator.pin_memory = pinning

    def was_pinned(self, tensor: torch.Tensor | None) -> bool:
        return tensor is not None and any(ref() is tensor for ref in self.tensors)

    def host(self, optimizer: torch.optim.Optimizer, offloaded: bool) -> set[int]:
        """The pinned storages and, where the optimizer is ``offloaded`` (it steps on the host), its parameters (ZeRO's
        float32 master partitions: ZeRO-3 does not pin them) and their state."""
        found = set(self.storages)
        for param, state in optimizer.state.items() if offloaded else ():
            found.add(param.untyped_storage().data_ptr())
            found.update(t.untyped_storage().data_ptr() for t in state.values() if isinstance(t, torch.Tensor))
        return found


def main() -> None:
    args = json.loads(sys.argv[1])
    out = Path(args["out"])
    report, rank = {}, 0
    build = backends.build
    pinned = Pinned()
    for run in args["runs"]:
        before: dict[int, torch.UntypedStorage] = {}  # held, so that no later tensor takes one's address

        def building(*a, before=before, **kw):
            gc.collect()
            model = a[1]
            trained = {p.untyped_storage().data_ptr() for p in model.parameters() if p.requires_grad}
            before.update((k, v) for k, v in storages().items() if k not in trained)
            return build(*a, **kw)

        backends.build = building
        cfg = load_config(TINY, [*run["overrides"], f"checkpoint.dir={out / run['name']}"])
        trainer = Trainer(cfg)
        backends.build = build
        rank, world = trainer.rank, trainer.backend.world_size
        module = trainer.backend.model
        module = module.module if hasattr(module, "module") else module
        held: list[tuple[int, int]] = []  # (all of it, what is in host memory)
        optimizer = trainer.backend.stepping_optimizer()
        zero = getattr(trainer.backend, "zero", None)
        offloaded = bool(getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False))

        def measure(*_, module=module, before=before, held=held, optimizer=optimizer, offloaded=offloaded):
            gc.collect()
            excluded = before.keys() | frozen_storages(module)
            left = {k: v.nbytes() for k, v in storages().items() if k not in excluded}
            host = pinned.host(optimizer, offloaded)
            held.append((sum(left.values()), sum(n for k, n in left.items() if k in host)))

        hook = optimizer.register_step_pre_hook(measure)
        trainer.train_step()
        held.clear()
        trainer.train_step()  # (ZeRO steps its optimizer once per parameter group: the largest counts)
        hook.remove()
        lay = layout(trainer.cfg, world)
        model = build_meta_model(trainer.cfg, lay.shards)
        trained = [p for p in model.parameters() if p.requires_grad]
        groups = [g["params"] for g in adamw(model, trained, trainer.cfg.train).param_groups]
        estimated = trainable_state_bytes(model, lay, groups)
        alive = storages()
        base = {k: alive[k].nbytes() for k in frozen_storages(module) if k in alive}
        partitions = {  # (ZeRO-3's partitions that DeepSpeed pinned, as it does under offload_param)
            p.ds_tensor.untyped_storage().data_ptr()
            for p in module.parameters()
            if not p.requires_grad and pinned.was_pinned(getattr(p, "ds_tensor", None))
        }
        frozen = [sum(base.values()), sum(n for k, n in base.items() if k in partitions)]
        report[run["name"]] = {
            "held": max(held),  # (ZeRO steps one parameter group after another: the step that holds the most)
            "estimated": [estimated, trainable_host_bytes(model, lay, groups)],
            "frozen": [frozen, [frozen_bytes(model, lay), frozen_host_bytes(model, lay)]],
        }
        trainer.checkpointer.release_lease()
        del trainer, module
        gc.collect()
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
