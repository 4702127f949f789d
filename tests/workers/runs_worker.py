"""One rank of a sequence of short training runs in one launch (tests/test_scale.py).

argv[1] is JSON: {"runs": [{"name", "overrides": [...], "steps": N, "resume": url|null, "eval": bool, "optimizer":
name|null}], "out": dir}. Each run builds a Trainer (the tiny config plus its overrides; with "optimizer", the
trainer's AdamW replaced by one of OPTIMIZERS, as a loop of the user's own would choose it), resumes if asked, takes N
steps, evaluates if asked and saves. Rank 0 writes out/runs.json: per run, each step's loss and gradient norm, the
eval loss, the saved step's URL, how many times a layer inside each transformer block ran (twice per
micro-batch when its activations are recomputed; not counted in a compiled block), how many all-gathers FSDP2 made
during the steps, how many groups it shards and what it held gathered at once (:class:`Gathered`; ZeRO-3's:
:class:`ZeroGathered`), what DeepSpeed's engine offloads to host memory (its own flags) and its reduction bucket's size,
the betas and eps of the optimizer that steps the adapter, how many graphs torch.compile compiled during the run,
and the bytes autograd saved for backward in the first step.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.distributed
from torch._dynamo.utils import counters
from torch.distributed.fsdp import FSDPModule
from transformers.models.gpt2 import modeling_gpt2

from dist_lora.config import load_config
from dist_lora.distributed import shutdown
from dist_lora.model import COMPILED, transformer_blocks
from dist_lora.train import Trainer
from tests.dist_utils import TINY


class AMSGrad(torch.optim.AdamW):
    """AdamW with AMSGrad's running maximum of the second moment (one more element-wise state field)."""

    def __init__(self, params, **kw):
        super().__init__(params, amsgrad=True, **kw)


class MomentumSGD(torch.optim.SGD):
    """SGD with momentum: its only state is ``momentum_buffer`` (no step count). Built as the trainer builds its
    AdamW, it takes AdamW's betas and eps too, and has no use for them."""

    def __init__(self, params, lr, weight_decay=0.0, betas=None, eps=None):
        super().__init__(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


OPTIMIZERS = {"amsgrad": AMSGrad, "sgd": MomentumSGD}


def first_layers_inside_the_blocks(model):
    """The first child of each of the model's transformer blocks (the classes HF lists in ``_no_split_modules``),
    or None for a compiled block (a hook inside would be compiled into its graph). transformers checkpoints a
    block's ``forward``, not its ``__call__``, so a recomputation runs the hooks of the block's children again but
    not the block's own."""
    return [None if getattr(b, COMPILED, False) else next(b.children()) for b in transformer_blocks(model)]


class SavedBytes:
    """While entered: the bytes of every tensor autograd saves for backward (activations, and the weights that a
    layer's backward reads; compiled graphs save through the same hooks)."""

    def __init__(self):
        self.bytes = 0

    def pack(self, t):
        self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def after(owner, name, then, before=None):
    """A patch of ``owner.name`` that calls ``then`` with the same arguments once the original has returned (and
    ``before``, if given, before it runs)."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before is not None:
            before(*args, **kwargs)
        out = original(*args, **kwargs)
        then(*args, **kwargs)
        return out

    return mock.patch.object(owner, name, wrapped)


class Gathered:
    """While entered: what FSDP2 holds gathered (its groups' unsharded parameters) each time one of its groups has
    gathered, in forward or backward, and as each group's backward begins: the most bytes held gathered at once and
    the groups held then, and the groups held as any transformer block's backward begins; and, with the buffers FSDP2
    gathers into (each all-gather's output, from the all-gather until its copy-out, or in forward until the next
    group's wait), the most held at once (``with_buffers``), noted also as each all-gather is issued and as each
    copy-out ends. A group is named by its module ("root": the model's own)."""

    def __init__(self, model):
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.cls = FSDPParamGroup
        self.names = {}
        for name, m in model.named_modules():
            if isinstance(m, FSDPModule):
                for group in m._get_fsdp_state()._fsdp_param_groups:
                    self.names.setdefault(group, name.removeprefix("base_model.model.") or "root")
        blocks = {id(b) for b in transformer_blocks(model)}
        self.blocks = {g for g in self.names if any(id(m) in blocks for m in g.modules)}
        self.bytes = {}  # each group's gathered bytes, read off its gathered tensors the first time it is gathered
        self.peak, self.at_peak, self.in_block_backward = 0, [], set()
        self.with_buffers = 0

    def note_buffers(self, copying=None):
        """The gathered groups, the group being copied out (``copying``'s parameters: gathered, not yet marked so)
        and every all-gather buffer alive."""
        outputs = {}
        for g in self.names:
            pending = [g._all_gather_result]
            if g.comm_ctx is not None and getattr(g.comm_ctx, "all_gather_state", None) is not None:
                pending.append(g.comm_ctx.all_gather_state.all_gather_result)
            for result in pending:
                if result is not None and result.all_gather_output is not None:
                    out = result.all_gather_output
                    outputs[id(out)] = out.numel() * out.element_size()
        held = [name for g, name in self.names.items() if g.is_unsharded or g is copying]
        self.with_buffers = max(
            self.with_buffers, sum(self.bytes.get(name, 0) for name in held) + sum(outputs.values())
        )

    def note(self, group, backward):
        from dist_lora.quantize import is_nf4, nf4_bytes

        def size(t):  # an NF4 weight is gathered as its 4-bit data and scalers
            return nf4_bytes(t) if is_nf4(t) else t.numel() * t.element_size()

        for g, name in self.names.items():
            if g.is_unsharded and name not in self.bytes:
                self.bytes[name] = sum(size(p._unsharded_param) for p in g.fsdp_params)
        held = sorted(name for g, name in self.names.items() if g.is_unsharded)
        if backward and group in self.blocks:
            self.in_block_backward.update(held)
        total = sum(self.bytes[name] for name in held)
        if total > self.peak:
            self.peak, self.at_peak = total, held

    def __enter__(self):
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group

        owner = {id(p): g for g in self.names for p in g.fsdp_params}

        def waited(group, *args, **kwargs):
            self.note(group, backward=False)
            self.note_buffers()

        def backward(group, *args, **kwargs):
            self.note(group, backward=True)
            self.note_buffers()

        self._patches = contextlib.ExitStack()
        for patch in (
            after(self.cls, "wait_for_unshard", waited),
            after(self.cls, "pre_backward", backward),
            after(self.cls, "unshard", lambda *args, **kwargs: self.note_buffers()),
            after(
                _fsdp_param_group,
                "foreach_all_gather_copy_out",
                lambda result, fsdp_params, *args, **kwargs: self.note_buffers(copying=owner.get(id(fsdp_params[0]))),
            ),
        ):
            self._patches.enter_context(patch)
        return self

    def __exit__(self, *exc):
        self._patches.__exit__(*exc)

    def to_json(self):
        return {
            "groups": self.bytes,
            "peak": self.peak,
            "at_peak": self.at_peak,
            "in_block_backward": sorted(self.in_block_backward),
            "with_buffers": self.with_buffers,
        }


class ZeroGathered:
    """While entered: what DeepSpeed ZeRO-3 holds gathered, measured in its tensors' storages, each time its parameter
    coordinator has fetched a module's parameters (and prefetched) and each time one of its all-gathers has been
    waited on: the storages of every parameter it does not keep whole that is gathered or being gathered (but a view
    of its own partition, as at one rank) and of the buffers of its all-gathers (those on the coordinator's registry
    of all-gathers in flight, and those being waited on), each counted once; the most at once in each step
    (:meth:`step`). And the bytes of those parameters by their statuses alone, the same moments (``statuses``: at
    one rank with the partitions offloaded, each gathered parameter is a copy on the device)."""

    def __init__(self, model):
        from deepspeed.runtime.zero import partition_parameters
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        self.cls, self.handles = PartitionedParameterCoordinator, partition_parameters
        self.params = list(model.parameters())
        self.coordinator, self.waiting = None, []
        self.now, self.steps, self.by_status, self.statuses = 0, [], 0, []

    def buffers(self, handle):
        h = self.handles
        if isinstance(handle, h.MultipleAllGatherHandles):
            for one in handle.handles:
                yield from self.buffers(one)
        elif isinstance(handle, h.AllGatherCoalescedHandle) and handle.partitions:
            yield handle.partitions[0]
        elif isinstance(handle, h.AllGatherHandle) and handle._AllGatherHandle__param_buffer is not None:
            yield handle._AllGatherHandle__param_buffer

    def note(self):
        gathered = [
            p for p in self.params if not p.ds_persist and p.ds_status != self.handles.ZeroParamStatus.NOT_AVAILABLE
        ]
        storages = {}
        for p in gathered:
            storage = p.data.untyped_storage()
            if storage.data_ptr() != p.ds_tensor.untyped_storage().data_ptr():
                storages[storage.data_ptr()] = storage.nbytes()
        registry = self.coordinator._PartitionedParameterCoordinator__inflight_param_registry
        for handle in [*registry.values(), *self.waiting]:
            for buffer in self.buffers(handle):
                storages[buffer.untyped_storage().data_ptr()] = buffer.untyped_storage().nbytes()
        self.now = max(self.now, sum(storages.values()))
        self.by_status = max(self.by_status, sum(p.ds_numel * p.element_size() for p in gathered))

    def fetching(self, coordinator, *args, **kwargs):
        self.coordinator = coordinator  # (before its waits note what is in flight)

    def waiting_on(self, handle, *args, **kwargs):
        self.waiting.append(handle)

    def waited(self, handle, *args, **kwargs):
        self.note()
        self.waiting.pop()

    def step(self):
        self.steps.append(self.now)
        self.statuses.append(self.by_status)
        self.now = self.by_status = 0

    def __enter__(self):
        h = self.handles
        self._patches = contextlib.ExitStack()
        fetched = after(self.cls, "fetch_sub_module", lambda *args, **kwargs: self.note(), before=self.fetching)
        self._patches.enter_context(fetched)
        for owner in (h.AllGatherHandle, h.AllGatherCoalescedHandle, h.MultipleAllGatherHandles):
            self._patches.enter_context(after(owner, "wait", self.waited, before=self.waiting_on))
        return self

    def __exit__(self, *exc):
        self._patches.__exit__(*exc)

    def to_json(self):
        return {"peak": max(self.steps, default=0), "steps": self.steps, "statuses": max(self.statuses, default=0)}


def reduce_bucket(backend) -> list[int] | None:
    """DeepSpeed's gradient reduction bucket, in elements, and the elements that train (whole, not partitions);
    None on other engines."""
    zero = getattr(backend, "zero", None)
    if zero is None:
        return None
    trained = [p for p in backend.model.parameters() if p.requires_grad]
    return [zero.reduce_bucket_size, sum(getattr(p, "ds_numel", p.numel()) for p in trained)]


def offloaded(backend) -> dict[str, bool] | None:
    """What the engine keeps in host memory, by its own flags: DeepSpeed's ZeRO optimizer's (the optimizer state,
    ZeRO-3's parameter partitions); FSDP2's parameters' (each sharded parameter, and so its gradient and Adam state:
    the optimizer steps the shards where they are)."""
    zero = getattr(backend, "zero", None)
    if zero is not None:
        return {
            "optimizer": bool(getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False)),
            "param": bool(getattr(zero, "offload_param", False)),
        }
    fsdp = [
        param
        for m in backend.model.modules()
        if isinstance(m, FSDPModule)
        for group in m._get_fsdp_state()._fsdp_param_groups
        for param in group.fsdp_params
    ]
    if not fsdp:
        return None
    on_host = all(param.offload_to_cpu for param in fsdp)
    return {"optimizer": on_host, "param": on_host}


def loss_function(model: torch.nn.Module) -> str:
    """The name of the loss function the transformers model inside ``model`` (PEFT, an engine) computes."""
    from transformers import PreTrainedModel

    hf = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
    function = hf.loss_function
    return getattr(function, "func", function).__name__


def main() -> None:
    args = json.loads(sys.argv[1])
    out = Path(args["out"])
    results = {}
    rank = 0
    for run in args["runs"]:
        torch._dynamo.reset()  # graphs an earlier run compiled would serve this one's blocks: count this run's own
        config = load_config(TINY, [*run["overrides"], f"checkpoint.dir={out / run['name']}"])
        optimizer = OPTIMIZERS.get(run.get("optimizer"), torch.optim.AdamW)
        with mock.patch.object(torch.optim, "AdamW", optimizer):  # the class the trainer builds its optimizer from
            trainer = Trainer(config)
        rank = trainer.rank
        if run.get("resume"):
            trainer.resume(run["resume"])
        calls: list[list[int]] = []  # per block, one entry per forward of a layer inside it
        hooks = []
        for layer in first_layers_inside_the_blocks(trainer.backend.model):
            calls.append([])
            if layer is not None:
                hooks.append(layer.register_forward_hook(lambda *_, mine=calls[-1]: mine.append(1)))
        graphs = counters["stats"]["unique_graphs"]
        saved = SavedBytes()
        losses, norms = [], []
        all_gather = torch.distributed.all_gather_single  # FSDP2's all-gather of a group, counted
        eager_attention = modeling_gpt2.eager_attention_forward  # the kernel GPT-2 runs under attention "eager"
        fsdp = any(isinstance(m, FSDPModule) for m in trainer.backend.model.modules())
        zero3 = getattr(trainer.backend, "stage", None) == 3
        gathered = (
            Gathered(trainer.backend.model)
            if fsdp
            else ZeroGathered(trainer.backend.model)
            if zero3
            else contextlib.nullcontext()
        )
        with (
            gathered,
            mock.patch.object(torch.distributed, "all_gather_single", wraps=all_gather) as gathers,
            mock.patch.object(modeling_gpt2, "eager_attention_forward", wraps=eager_attention) as eager,
        ):
            for i in range(run["steps"]):
                with saved if i == 0 else contextlib.nullcontext():
                    losses.append(trainer.train_step())
                if zero3:
                    gathered.step()
                norms.append(trainer.grad_norm)
        for hook in hooks:
            hook.remove()
        evaluated = trainer.evaluate() if run.get("eval") else None
        url = trainer.save()
        trainer.close()
        trainer.checkpointer.release_lease()
        results[run["name"]] = {
            "losses": losses,
            "grad_norms": norms,
            "step": url,
            "block_forwards": len(calls[0]),  # the first block's
            "forwards_per_block": [len(c) for c in calls],
            "all_gathers": gathers.call_count,
            "eager_attention_calls": eager.call_count,
            "loss_function": loss_function(trainer.backend.model),
            "group_lrs": [group["lr"] for group in trainer.backend.lr_groups()],
            "lr_scales": [group.get("lr_scale", 1.0) for group in trainer.backend.lr_groups()],
            "fsdp_groups": len(  # a group of several modules (fully_shard of a list) shares one state
                {id(m._get_fsdp_state()) for m in trainer.backend.model.modules() if isinstance(m, FSDPModule)}
            ),
            "blocks": len(transformer_blocks(trainer.backend.model)),
            "gathered": gathered.to_json() if fsdp or zero3 else None,
            "eval_loss": evaluated,
            "eval_accuracy": trainer.eval_history[-1]["eval_accuracy"] if run.get("eval") else None,
            "graphs": counters["stats"]["unique_graphs"] - graphs,  # what torch.compile compiled during the run
            "first_step_saved_bytes": saved.bytes,
            "offload": offloaded(trainer.backend),
            "reduce_bucket": reduce_bucket(trainer.backend),
            "adamw": {k: trainer.backend.stepping_optimizer().defaults.get(k) for k in ("betas", "eps")},
        }
    if rank == 0:
        (out / "runs.json").write_text(json.dumps(results, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
