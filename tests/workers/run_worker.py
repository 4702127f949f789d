"""One rank of a multi-process test run (launched by torchrun from tests/dist_utils.py).

argv[1] is JSON: {"config": {...}, "out": dir, "resume": url|null, "phases": ["train:3", "save_traced", ...]}, or
{"jobs": [such specs]} run one after the other in the same launch.
Phases: train:N (N optimizer steps), save, save_traced (save while recording every collective, dump this rank's
local pieces and, on rank 0, the engine's own full tensors as an independent reference), save_then_step (dump this rank's local pieces, save with the snapshot held until the next
training step's optimizer step is seen waiting for it, record that it waited), logits (rank 0 writes the logits of a fixed
batch), nf4_shards (each rank checks its NF4 shards against torchao's to_nf4 of the whole weight, chunked; writes
out/nf4-rankR.json), poison:LAYER:out|grad@R (rank R makes LAYER's output, or its adapter's gradient, NaN; the next
step must raise NonFiniteError on every rank: each writes out/error-rankR.txt), stop_in_eval@R (rank R is asked to
stop, as by SIGTERM, during its 2nd eval forward; each rank writes out/stop-eval-rankR.json: what evaluate()
returned, the forwards it ran and the evaluations recorded), fit_clock:M0/M1 (fit() to max_steps with rank r's
clock, which checkpoint.every_minutes reads, moving M_r minutes a step). Rank 0 writes out/losses.json.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from dist_lora.checkpointer import Checkpointer
from dist_lora.config import config_from_dict
from dist_lora.distributed import shutdown
from dist_lora.train import Trainer
from tests.dist_utils import HeldSnapshot

COLLECTIVES = [
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "gather",
    "scatter",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "_all_gather_base",
    "_reduce_scatter_base",
]


def traced(record: list):
    """Wrap every torch.distributed collective to record (op, bytes of the tensor this rank passes in)."""
    originals = {}
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        originals[name] = fn

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)] or [
                v for v in kwargs.values() if isinstance(v, torch.Tensor)
            ]
            nbytes = tensors[0].numel() * tensors[0].element_size() if tensors else 0
            if isinstance(args[0] if args else None, list):  # all_gather(list, tensor)
                nbytes = tensors[0].numel() * tensors[0].element_size() if tensors else 0
            record.append([_name, int(nbytes), int(tensors[0].numel()) if tensors else 0])
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapper)
    return originals


def dump_pieces(trainer: Trainer, path: Path) -> None:
    """This rank's live pieces (weights and Adam moments), named key::field::offset."""
    pieces = {}
    for p in trainer.backend.local_pieces():
        for field, t in p.fields.items():
            pieces[f"{p.key}::{field}::{p.offset}"] = t.detach().cpu().clone().contiguous()
    save_file(pieces, str(path))


def dump_reference(trainer: Trainer, path: Path) -> None:
    """Collective: the full adapter and Adam moments as each engine's own API gathers them, independent of
    dist_lora's pieces and gather (FSDP2: ``DTensor.full_tensor()``; ZeRO: ``safe_get_full_fp32_param`` and
    ``safe_get_full_optimizer_state``; DDP: the replicated tensors). Rank 0 writes them, named key::field."""
    backend, full = trainer.backend, {}
    for key, p in backend.adapter().items():  # the same order on every rank: every call below is a collective
        if backend.name == "deepspeed":
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            full[f"{key}::weight"] = safe_get_full_fp32_param(p).float().cpu().clone()  # the master (bf16: not p)
            for field in ("exp_avg", "exp_avg_sq"):
                full[f"{key}::{field}"] = safe_get_full_optimizer_state(p, field).float().cpu().clone()
        else:
            state = backend.optimizer.state[p]
            tensors = {"weight": p.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
            for field, t in tensors.items():
                t = t.full_tensor() if hasattr(t, "full_tensor") else t
                full[f"{key}::{field}"] = t.float().cpu().clone()
    if trainer.rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, str(path))


def check_nf4_shards(trainer: Trainer, config: dict) -> dict:
    """Every NF4 shard this rank holds against the matching chunk of torchao's to_nf4 over the whole weight, read
    from the base's files: inner tensors equal bit for bit."""
    from torch.distributed.tensor import DTensor

    from dist_lora.backends.fsdp import FSDPBackend
    from dist_lora.lora import base_key, canonical_name
    from dist_lora.quantize import BLOCK, INNER_TENSORS, SCALER_BLOCK, is_nf4, nf4_module
    from dist_lora.weights import BaseWeights

    nf4 = nf4_module()
    weights = BaseWeights(config["model"]["name_or_path"])
    dtype = getattr(torch, config["model"].get("dtype", "float32"))
    checked, mismatched = 0, []
    for name, p in trainer.backend.model.named_parameters():
        if not is_nf4(p):
            continue
        key = base_key(canonical_name(name))
        whole = nf4.to_nf4(weights.read(key).to(dtype), BLOCK, SCALER_BLOCK)
        local = p.to_local() if isinstance(p, DTensor) else p
        start = FSDPBackend._row_offset(p) if isinstance(p, DTensor) else 0
        rows = local.shape[0]
        want = torch.chunk(whole, whole.shape[0] // rows, dim=0)[start // rows]
        same = all(torch.equal(getattr(local, n), getattr(want, n)) for n in (*INNER_TENSORS, "scaler_mean", "nf4"))
        checked += 1
        if not same:
            mismatched.append(key)
    return {"checked": checked, "mismatched": mismatched}


class NanGrad(torch.autograd.Function):
    """Identity forward; NaN backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def poisoned_step(trainer: Trainer, spec: str) -> str:
    """Make one layer's output (``out``) or its adapter's gradient (``grad``) NaN on one rank, take a step, and
    return the error it raised on this rank ("" if none)."""
    from dist_lora.guard import NonFiniteError
    from dist_lora.lora import base_key

    target, _, on_rank = spec.rpartition("@")
    layer, kind = target.rsplit(":", 1)
    handles = []
    if trainer.rank == int(on_rank):
        for name, module in trainer.backend.model.named_modules():
            if base_key(name) == layer:
                if kind == "out":
                    handles.append(module.register_forward_hook(lambda m, a, o: o * float("nan")))
                else:  # the output unchanged, its gradient NaN (FSDP2 sets the sharded grads itself: no hook)
                    handles.append(module.lora_B["default"].register_forward_hook(lambda m, a, o: NanGrad.apply(o)))
                break
        assert handles, layer
    try:
        trainer.train_step()
    except NonFiniteError as e:
        return str(e)
    finally:
        for h in handles:
            h.remove()
    return ""


def stopped_eval(trainer: Trainer, on_rank: int) -> dict:
    """Evaluate with rank ``on_rank`` asked to stop (what its SIGTERM handler records) during its 2nd forward."""
    forwards = 0
    outputs = trainer.backend.outputs

    def counted(batch):
        nonlocal forwards
        forwards += 1
        if forwards == 2 and trainer.rank == on_rank:
            trainer.stop.received = signal.SIGTERM
        return outputs(batch)

    trainer.backend.outputs = counted
    try:
        loss = trainer.evaluate()
    finally:
        trainer.backend.outputs = outputs
    return {"returned": loss, "forwards": forwards, "recorded": len(trainer.eval_history)}


def run(args: dict) -> None:
    """One job: a Trainer built from args["config"], resumed if asked, through its phases."""
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config_from_dict(args["config"]))
    rank = trainer.rank
    if args.get("resume"):
        trainer.resume(args["resume"])
    losses = {}
    for phase in args["phases"]:
        if phase.startswith("train:"):
            for _ in range(int(phase.split(":")[1])):
                loss = trainer.train_step()
                losses[trainer.step] = loss
        elif phase == "save":
            trainer.save()
        elif phase == "save_traced":
            record: list = []
            originals = traced(record)
            try:
                trainer.save()
                trainer.close()  # an asynchronous save gathers in the background: record all of it
            finally:
                for name, fn in originals.items():
                    setattr(dist, name, fn)
            dump_pieces(trainer, out / f"pieces-rank{rank}.safetensors")
            dump_reference(trainer, out / "reference.safetensors")
            (out / f"comm-rank{rank}.json").write_text(json.dumps(record))
        elif phase == "save_then_step":
            dump_pieces(trainer, out / f"pieces-rank{rank}.safetensors")  # the state the step must hold
            with HeldSnapshot(type(trainer.backend), Checkpointer) as held:
                trainer.save()
                pending = held.snapshot_pending()  # save() returned without taking the snapshot
                loss = trainer.train_step()  # its optimizer step must wait for the snapshot
                held.step_done()
            losses[trainer.step] = loss
            (out / f"wait-rank{rank}.json").write_text(
                json.dumps({"pending_after_save": pending, "step_waited": held.step_waited_for_snapshot})
            )
        elif phase == "nf4_shards":
            (out / f"nf4-rank{rank}.json").write_text(json.dumps(check_nf4_shards(trainer, args["config"])))
        elif phase.startswith("fit_clock:"):  # fit_clock:M0/M1/...: rank r's clock moves M_r minutes a step
            minutes = float(phase.removeprefix("fit_clock:").split("/")[rank])
            trainer.clock.read = lambda minutes=minutes: trainer.step * minutes * 60
            trainer.fit()
        elif phase.startswith("stop_in_eval@"):
            (out / f"stop-eval-rank{rank}.json").write_text(json.dumps(stopped_eval(trainer, int(phase[13:]))))
        elif phase.startswith("poison:"):
            (out / f"error-rank{rank}.txt").write_text(poisoned_step(trainer, phase.removeprefix("poison:")))
        elif phase == "logits":
            vocab = max(max(ids) for ids in trainer.data.train.ds["input_ids"]) + 1
            x = (torch.arange(2 * 16).view(2, 16) * 7 % vocab).to(trainer.device)
            with torch.no_grad():
                logits = trainer.backend.model(input_ids=x).logits.float().cpu()
            if rank == 0:
                save_file(
                    {"logits": logits.contiguous(), "input_ids": x.cpu()},
                    str(out / f"logits-{trainer.step}.safetensors"),
                )
        else:
            raise ValueError(phase)
    trainer.close()
    trainer.checkpointer.release_lease()
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))


def main() -> None:
    args = json.loads(sys.argv[1])
    for job in args.get("jobs", [args]):  # several jobs in one launch pay the start-up (imports, init) once
        run(job)
    shutdown()


if __name__ == "__main__":
    main()
