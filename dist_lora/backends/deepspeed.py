"""DeepSpeed ZeRO 1, 2 and 3 with a client torch AdamW.

Where the adapter lives (see shared RESHARD-NOTES):
- ZeRO-3: each parameter is partitioned on its own; rank r holds elements [r*s, (r+1)*s) of the flattened tensor,
  s = ceil(numel / world), zero-padded at the end. The fp32 master and Adam moments are ranges of the flat group
  tensors (``fp32_partitioned_groups_flat``), found through ``grad_position``; the model's copy is ``ds_tensor``.
- ZeRO-1/2: parameters are replicated; the fp32 master and moments are partitioned over flat groups, and each
  parameter's range on this rank is ``_hp_mapping.lp_fragment_address``. ZeRO-1 in bf16 with fp32 gradient
  accumulation is ``BF16_Optimizer``, the same layout under other names (:func:`zero_layout`).
Adam's ``step`` lives once per flat group. Optimizer state is lazy: a fresh engine has none until its first step,
so loading creates it first. Only this module imports deepspeed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import weakref
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch

from dist_lora.backends.base import Backend, LocalPiece, Staging, elementwise_state
from dist_lora.backends.deepspeed_config import ADAMW_SETTINGS, ds_config
from dist_lora.constants import ENV_DS_ACCELERATOR, WEIGHT_FIELD
from dist_lora.lora import base_key
from dist_lora.model import release_freed_memory, skip_weight_init
from dist_lora.weights import BaseWeights

log = logging.getLogger(__name__)


def import_deepspeed() -> Any:
    if not torch.cuda.is_available():
        os.environ.setdefault(ENV_DS_ACCELERATOR, "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "parallel.backend=deepspeed needs DeepSpeed: pip install 'dist-lora[deepspeed]' "
            "(on CPU: DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 pip install deepspeed)"
        ) from e
    return deepspeed


def shm_workspace() -> str:
    """This rank's shared-memory workspace of DeepSpeed's CPU all-reduce, as DeepSpeed's shm op names it.

    Launched by the ``deepspeed`` launcher on one node (it sets ``LOCAL_SIZE``), that op creates a 66 MB
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank at its communication init and never
    unlinks it: every run left them behind, in RAM, until the host rebooted (:meth:`DeepSpeedBackend.ready`
    unlinks it). Other launches (torchrun) and GPUs create none."""
    parts = [str(os.getuid()), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")]
    return os.path.join("/dev/shm", "_".join(["deepspeed_allreduce_buffer", *parts, str(torch.distributed.get_rank())]))


def _fill_partitions(model: Any, weights: BaseWeights) -> None:
    """Each rank writes its own partition of every ZeRO-3 parameter: elements [rank*s, (rank+1)*s) of the
    flattened tensor (s = ``ds_tensor.numel()``, the last partition zero-padded), read from the files by the rows
    that hold them. On the CPU a whole partition of the files' dtype becomes a view of the file's pages instead
    (:meth:`BaseWeights.mapped_flat`; the ones LoRA trains get memory of their own when DeepSpeed flattens them
    for its optimizer). Buffers (not partitioned) are read whole where the files hold them."""
    rank = torch.distributed.get_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            part = p.ds_tensor.numel()
            held = max(0, min(p.ds_numel, (rank + 1) * part) - rank * part)  # the rest is padding
            key, begin = base_key(name), rank * part
            if held == part and p.ds_tensor.device.type == "cpu":
                view = weights.mapped_flat(key, begin, begin + part, p.ds_tensor.dtype)
                if view is not None:
                    p.ds_tensor.data = view
                    continue
            target = p.ds_tensor.view(-1)
            target[held:].zero_()
            weights.flat(key, begin, begin + held, out=target[:held])
        for name, b in model.named_buffers():
            if base_key(name) in weights:
                b.copy_(weights.rows(base_key(name), 0, b.shape[0] if b.dim() else 1).reshape(b.shape))
    weights.drop_unused_maps()


def partition_of(rank: int, world: int) -> Callable[[tuple[int, ...]], tuple[list[tuple[int, int]], bool]]:
    """A rank's share of every base tensor as ZeRO-3 partitions it (for :meth:`BaseWeights.read_ahead`):
    elements ``[rank * s, (rank + 1) * s)`` of the flattened tensor, ``s = ceil(numel / world)``, whole unless
    they are the last, zero-padded partition (read, not mapped: :func:`_fill_partitions`)."""

    def share(shape: tuple[int, ...]) -> tuple[list[tuple[int, int]], bool]:
        numel = math.prod(shape)
        part = -(-numel // world)
        first, last = min(rank * part, numel), min((rank + 1) * part, numel)
        return [(first, last)], last - first == part

    return share


def zero_layout(optimizer: Any) -> tuple[int, str, str] | None:
    """What a DeepSpeed ZeRO optimizer is: (its stage, the attribute holding its flat fp32 partitions (one per
    parameter group, keys of its inner optimizer's state), the attribute holding its low-precision parameter groups
    (unused at stage 3)); None for any other optimizer. ZeRO-1 with bf16 weights and fp32 gradient accumulation
    (``data_types.grad_accum_dtype``) is DeepSpeed's ``BF16_Optimizer``, laid out as ZeRO-1 under other names."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return 3, "fp32_partitioned_groups_flat", "fp16_groups"
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return (2 if optimizer.partition_gradients else 1), "single_partition_of_fp32_groups", "bit16_groups"
    if hasattr(optimizer, "fp32_groups_flat_partition") and hasattr(optimizer, "bf16_groups"):
        return 1, "fp32_groups_flat_partition", "bf16_groups"
    return None


def _partition_unbroadcast(init: Any, param: Any) -> None:
    """``zero.Init._zero_init_param`` without its broadcast from rank 0, and without the copy of the constructed
    values into the partition: the files fill it. DeepSpeed takes a partition that exists as made, so this rank's
    is allocated here, untouched (copying the never-initialised construction into fresh memory cost 5.3 s of a
    7.2 s load of a 6.2 GB base at one rank). Offloaded, quantized or secondary (ZeRO++) partitions, which
    DeepSpeed makes differently, are left to DeepSpeed."""
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    init._convert_to_deepspeed_param(param)
    plain = (
        init.remote_device == init.local_device
        and not init.pin_memory
        and not init.quantized_nontrainable_weights
        and init.zero_param_process_group is None
    )
    if plain:
        aligned = init._aligned_size(param)
        part: Any = torch.empty(
            aligned // init._partition_world_size(param), dtype=param.dtype, device=init.local_device
        )
        part.requires_grad = False
        part.ds_numel, part.status, part.final_location = part.numel(), PartitionedParamStatus.AVAILABLE, None
        param.ds_tensor, param.ds_numel_aligned = part, aligned
    param.partition()  # frees the constructed tensor


def _model_dtype_unless_half(set_dtype: Callable[..., None], dtype: torch.dtype) -> Callable[..., None]:
    """``zero.Init._set_dtype`` that keeps the model's ``dtype`` where the DeepSpeed config turns neither bf16 nor
    fp16 on. zero.Init casts every tensor built under it to fp32 then (a bf16 base became fp32: twice its bytes, each
    tensor converted as it was read, and not what the full path loads), while the engine leaves a model it is
    given in its own dtype; with bf16 or fp16 on, the engine casts the base to that type, as zero.Init does."""

    def set_model_dtype(init: Any, ds_config: Any, given: torch.dtype | None) -> None:
        set_dtype(init, ds_config, given)
        if given is None and init.dtype == torch.float32:
            init.dtype = dtype

    return set_model_dtype


def _release_engine(engine: Any) -> None:
    """Let an engine go once nothing uses it. DeepSpeed keeps every engine alive for the life of the process, by
    three holds that Python's collector cannot end: its ZeRO optimizer hooks each trainable parameter's gradient
    accumulator (a reference autograd keeps in C++, out of the collector's sight, on the cycle back to the engine);
    ZeRO-3 pushes the top module on the module-level ``parameter_offload.FWD_MODULE_STACK``, which nothing pops; and
    ZeRO-3's parameter coordinator memoizes which parameters to release in an ``lru_cache`` on its class, keyed by
    (coordinator, module, step), shared by every engine and never cleared. ``engine.destroy()`` removes the hooks;
    the module is taken off the list (``list.remove``, one step under the GIL: another engine may be running
    forward); and the cache is cleared (another live engine only computes its entries again). Best effort: an engine
    that cannot be released stays, with a warning (it runs after training has succeeded)."""
    try:
        engine.destroy()
        from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator
    except Exception as e:  # best effort, never a failure of the run that trained: the engine then stays
        log.warning("could not release a DeepSpeed engine (%s: %s); its memory stays until exit", type(e).__name__, e)
        return
    with contextlib.suppress(ValueError):  # (each of these is looked up: another DeepSpeed may lack it)
        getattr(parameter_offload, "FWD_MODULE_STACK", []).remove(engine.module)
    _clear_release_memo(partitioned_param_coordinator)


def _clear_release_memo(partitioned_param_coordinator: Any) -> None:
    """Clear the ``lru_cache`` in which ZeRO-3's parameter coordinator memoizes, for every coordinator, which
    parameters each module releases (it holds the coordinators and modules until cleared)."""
    coordinator = getattr(partitioned_param_coordinator, "PartitionedParameterCoordinator", object)
    method = vars(coordinator).get("_PartitionedParameterCoordinator__params_to_release")
    cells = getattr(method, "__closure__", None) or ()  # under DeepSpeed's NVTX wrapper, which keeps no __wrapped__
    for memo in (method, *(cell.cell_contents for cell in cells)):
        if hasattr(memo, "cache_clear"):
            memo.cache_clear()


def zero3_gathered_bytes(
    model: Any, zero: dict[str, Any], batch: tuple[int, int], world: int, micro_batches: int = 3
) -> int:
    """The most ZeRO-3 holds gathered at once per rank over ``micro_batches`` forwards and backwards of ``model``
    (``dist-lora check``'s, on the meta device) on ``batch`` (rows, tokens) of token ids at ``world`` ranks: the
    bytes of the gathered copies of every parameter not kept whole (``stage3_param_persistence_threshold``) and of
    the buffers its all-gathers fill, at the most of any of its fetches and any wait on an all-gather. Not an
    estimate: DeepSpeed's own module hooks, set up as the engine sets them from ``zero`` (its ``zero_optimization``
    section; the leaf modules too), record one forward and backward run under FakeTensorMode (nothing computed or
    allocated; :func:`_zero3_events`), and DeepSpeed's own parameter coordinator then takes the micro-batches'
    fetches and releases in that order, over stand-ins of ZeRO's parameters whose all-gathers hold what
    DeepSpeed's hold (:class:`_Gathers`). So DeepSpeed's rules decide, from its trace of the first micro-batch:
    prefetching (``stage3_prefetch_bucket_size``), keeping what is used again soon (``stage3_max_reuse_distance``),
    the limit on what prefetching may add (``stage3_max_live_parameters``), the parameters a recomputed block reads,
    and a parameter read outside its module's forward, which ZeRO-3 gathers for the module whose forward is running.
    Raises ValueError naming what it cannot follow: a setting that changes how ZeRO-3 gathers (quantized weights,
    hpZ, ZenFlow, a module granularity threshold, all-reduce fetches), a forward that depends on the data (a
    MoE's routing) or does not run on the meta device. ``model`` keeps ZeRO's attributes (check's own, dropped
    after)."""
    import_deepspeed()
    import deepspeed.comm
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus, _init_external_params
    from deepspeed.utils.z3_leaf_module import apply_zero_leaf_module_config

    config = DeepSpeedZeroConfig(**zero)
    changed = {
        "zero_quantized_weights": config.zero_quantized_weights,
        "zero_quantized_nontrainable_weights": config.zero_quantized_nontrainable_weights,
        "zero_hpz_partition_size": config.zero_hpz_partition_size > 1,
        "zenflow": config.zenflow is not None,
        "stage3_module_granularity_threshold": config.module_granularity_threshold > 0,
        "stage3_use_all_reduce_for_fetch_params": config.use_all_reduce_for_fetch_params,
    }
    if any(changed.values()):
        raise ValueError(f"{', '.join(key for key, on in changed.items() if on)} changes how ZeRO-3 gathers")
    apply_zero_leaf_module_config(model, config.leaf_module)
    modules = list(model.modules())
    for m in modules:
        _init_external_params(m)
        parameter_offload.ensure_zero_ordered_dict(m)
    events = _zero3_events(model, batch)
    offloaded = config.offload_param is not None and config.offload_param.device != "none"
    gathers = _Gathers(world, offloaded, config.allgather_sequential)

    class Partition:  # (neither quantized nor on NVMe)
        final_location = None

    persisted = 0
    for i, (_, p) in enumerate(model.named_parameters()):  # (DeepSpeedZeRoOffload.mark_persistent_parameters)
        persist = p.numel() <= config.param_persistence_threshold
        persist &= persisted + p.numel() <= config.model_persistence_threshold
        persisted += p.numel() if persist else 0
        p.ds_id, p.ds_numel, p.ds_shape, p.ds_persist = i, p.numel(), p.shape, persist
        p.ds_status, p.ds_tensor, p.ds_secondary_tensor = ZeroParamStatus.NOT_AVAILABLE, Partition(), None
        p.nvme_swapper, p.ds_active_sub_modules, p.is_external_param = None, set(), False
        p.partition_numel = lambda p=p: p.numel()  # (the coordinator's profiling alone reads it)
        p.all_gather_coalesced = gathers.all_gather_coalesced
        p.all_gather = lambda *args, p=p, **kwargs: gathers.read_outside(p)
        p.partition = lambda *args, p=p, **kwargs: gathers.release(p)
        p.ds_summary = lambda *args, p=p, **kwargs: {"id": p.ds_id, "status": p.ds_status.name}

    class Offload(parameter_offload.DeepSpeedZeRoOffload):  # what its module hooks call, over the coordinator
        def __init__(self, coordinator: Any) -> None:
            self.module, self.param_coordinator, self.zenflow = model, coordinator, False

    def in_forward(on: bool) -> None:  # (the engine's flag that lets a parameter read in a forward gather it)
        for m in modules:
            m._parameters._in_forward = on

    stack = parameter_offload.FWD_MODULE_STACK
    depth, graph_task = len(stack), [-1]
    cpu = CPU_Accelerator()  # (no stream nor event, even on a GPU)
    try:
        with contextlib.ExitStack() as scope:
            scope.enter_context(mock.patch.object(deepspeed.comm, "get_rank", return_value=0))  # (its debug prints)
            scope.enter_context(mock.patch.object(partitioned_param_coordinator, "get_accelerator", lambda: cpu))
            scope.enter_context(  # (it checks each rank recorded the same trace)
                mock.patch.object(partitioned_param_coordinator, "assert_ints_same_as_other_ranks", lambda ints: None)
            )
            # (a forward inside a backward is a recomputation, which the coordinator tells by autograd's graph task)
            scope.enter_context(mock.patch.object(torch._C, "_current_graph_task_id", lambda: graph_task[0]))
            coordinator = partitioned_param_coordinator.PartitionedParameterCoordinator(
                prefetch_bucket_sz=int(config.prefetch_bucket_size),
                max_reuse_distance_in_numel=int(config.max_reuse_distance),
                max_available_parameters_in_numel=int(config.max_live_parameters),
                allgather_stream=None,
                inflight_param_registry=gathers.in_flight,
            )
            offload = Offload(coordinator)
            stack.append(model)  # (the engine's top module, below each module whose forward runs)
            for _ in range(micro_batches):
                coordinator.reset_step()  # (the engine's hook at the start of each forward)
                in_forward(True)
                for kind, module, *detail in events:
                    if kind == "fetch":
                        forward, recomputing = detail
                        graph_task[0] = 0 if recomputing else -1
                        if forward:
                            offload.pre_sub_module_forward_function(module)
                        else:
                            offload.pre_sub_module_backward_function(module)
                        gathers.note()
                    elif kind == "release" and detail[0]:
                        stack.pop()  # (the engine's forward hook pops it before it releases)
                        offload.post_sub_module_forward_function(module)
                    elif kind == "release":
                        offload.post_sub_module_backward_function(module)
                    elif kind == "read":
                        module._parameters[detail[0]]  # (a gather where ZeRO-3 would gather on reading it)
                    else:  # "backward": the engine's forward has returned
                        in_forward(False)
                coordinator.release_backward_leftovers()
    finally:
        del stack[depth:]
        _clear_release_memo(partitioned_param_coordinator)
    return gathers.peak


class _Gathers:
    """ZeRO-3's all-gathers as :func:`zero3_gathered_bytes` replays them at ``world`` ranks: what each holds, as
    DeepSpeed's ``partition_parameters`` allocates it, counted in bytes (``held``; the most at a fetch or a wait:
    ``peak``), nothing allocated:

    - at one rank (``_no_gather_coalesced``) a parameter is a view of its own partition, copied to the device only
      where the partitions are offloaded;
    - one parameter, or ``stage3_allgather_sequential`` (``_all_gather_sequential``): the parameter is a view of the
      buffer gathered into, its elements padded to a multiple of the ranks;
    - several (``_all_gather_coalesced``): a flat buffer (one per dtype) of each parameter's padded partition from
      every rank, and at the wait a copy of each parameter out of it; the handle, and with it the buffer, lives until
      the coordinator has taken each of its parameters off its registry of all-gathers in flight (``in_flight``);
    - a parameter read outside its module's forward (``Init._all_gather``): a padded buffer, at any world size.

    A persistent parameter's own copy is not counted (it is the frozen base's, whole on each rank); a buffer it is
    gathered in is."""

    def __init__(self, world: int, offloaded: bool, sequential: bool) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.status = ZeroParamStatus
        self.world, self.offloaded, self.sequential = world, offloaded, sequential
        self.own: dict[int, int] = {}  # the bytes of its own that each gathered parameter holds, by id
        self.held = self.peak = 0
        self.in_flight = _InFlight()

    def padded(self, p: Any) -> int:
        return -(-p.ds_numel // self.world) * self.world * p.element_size()

    def hold(self, p: Any, status: Any, own: int) -> None:
        if not p.ds_persist:
            self.held += own - self.own.pop(id(p), 0)
            self.own[id(p)] = own
        p.ds_status = status

    def note(self) -> None:
        self.peak = max(self.peak, self.held)

    def all_gather_coalesced(self, params: list[Any], quantize: bool = False) -> _Gather:
        params = list(params)
        coalesced = self.world > 1 and len(params) > 1 and not self.sequential
        for p in params:
            if self.world == 1:
                own = p.ds_numel * p.element_size() if self.offloaded else 0
            else:
                own = 0 if coalesced else self.padded(p)
            self.hold(p, self.status.INFLIGHT, own)
        gather = _Gather(self, params, sum(self.padded(p) for p in params) if coalesced else 0)
        self.held += gather.buffer
        return gather

    def read_outside(self, p: Any) -> None:
        self.hold(p, self.status.AVAILABLE, self.padded(p))

    def release(self, p: Any) -> None:
        self.hold(p, self.status.NOT_AVAILABLE, 0)


class _Gather:
    """One all-gather in flight (DeepSpeed's handle): waited on for each of its parameters, done at the first wait;
    ``buffer``: the bytes of its flat buffer, if it gathers into one (its parameters are then copied out of it)."""

    def __init__(self, gathers: _Gathers, params: list[Any], buffer: int) -> None:
        self.gathers, self.params, self.buffer = gathers, params, buffer
        self.copied_out = buffer > 0
        self.listed = set(params)  # its parameters still on the coordinator's registry
        self.done = False

    def wait(self, handle_dependency: bool = True) -> None:
        g = self.gathers
        if not self.done:
            for p in self.params:
                g.hold(p, g.status.AVAILABLE, p.ds_numel * p.element_size() if self.copied_out else g.own.get(id(p), 0))
            self.done = True
        g.note()
        self.drop()

    def drop(self) -> None:
        if not self.listed and self.buffer:
            self.gathers.held -= self.buffer
            self.buffer = 0


class _InFlight(dict):
    """The coordinator's registry of all-gathers in flight (a parameter to its :class:`_Gather`): as a parameter
    is taken off it, its all-gather's buffer goes once none of its parameters is left, as DeepSpeed's handle does
    with its last reference."""

    def pop(self, param: Any) -> _Gather:  # type: ignore[override]
        gather: _Gather = super().pop(param)
        gather.listed.discard(param)
        return gather

    def clear(self) -> None:
        gathers = list(self.values())
        super().clear()
        for gather in gathers:
            gather.listed.clear()
            gather.drop()


def _zero3_events(model: Any, batch: tuple[int, int]) -> list[tuple[Any, ...]]:
    """What ZeRO-3's module hooks see in one forward and backward of ``model`` (meta, prepared as
    :func:`zero3_gathered_bytes` prepares it) on ``batch`` of token ids, run under FakeTensorMode, in order:
    ``("fetch", module, forward, recomputing)``, ``("release", module, forward)``, ``("read", module, name)`` (a
    parameter read in the forward) and ``("backward", None)`` where the forward ends. DeepSpeed's own hooks are
    registered for the run and removed after. Raises ValueError if the forward does not run on the meta device."""
    from collections import OrderedDict

    from deepspeed.runtime.zero import parameter_offload
    from torch._subclasses.fake_tensor import FakeTensorMode

    events: list[tuple[Any, ...]] = []
    stack, forward = parameter_offload.FWD_MODULE_STACK, [True]

    class Recorder(parameter_offload.DeepSpeedZeRoOffload):  # its module hooks, noting what they would do
        def __init__(self) -> None:
            self.module, self.param_coordinator, self.zenflow = model, None, False
            self.forward_hooks: list[Any] = []
            self.backward_hooks: list[Any] = []

        def pre_sub_module_forward_function(self, sub_module: Any) -> None:
            stack.append(sub_module)  # (as DeepSpeed's does; its forward hook pops it)
            events.append(("fetch", sub_module, True, torch._C._current_graph_task_id() != -1))

        def post_sub_module_forward_function(self, sub_module: Any) -> None:
            events.append(("release", sub_module, True))

        def pre_sub_module_backward_function(self, sub_module: Any) -> None:
            events.append(("fetch", sub_module, False, False))

        def post_sub_module_backward_function(self, sub_module: Any) -> None:
            events.append(("release", sub_module, False))

    def read(parameters: Any, name: str) -> Any:
        if forward[0]:
            events.append(("read", parameters._parent_module, name))
        return OrderedDict.__getitem__(parameters, name)

    recorder, depth = Recorder(), len(stack)
    try:
        recorder._register_deepspeed_module(model)
        stack.append(model)
        with (
            mock.patch.object(parameter_offload.ZeROOrderedDict, "__getitem__", read),
            mock.patch.object(logging.getLogger("torch._subclasses.fake_tensor"), "disabled", True),  # (its failures
            FakeTensorMode(allow_non_fake_inputs=True),  # are logged with a traceback before they are raised)
        ):
            ids = torch.zeros(batch, dtype=torch.long, device="meta")
            loss = model(input_ids=ids, labels=ids).loss
            forward[0] = False
            events.append(("backward", None))
            loss.backward()
    except Exception as e:  # (a forward that reads its data: a MoE's routing)
        first = str(e).strip().splitlines()[:1]
        raise ValueError(f"its forward did not run on the meta device ({type(e).__name__}: {''.join(first)})") from e
    finally:
        for handle in recorder.forward_hooks + recorder.backward_hooks:
            handle.remove()
        del stack[depth:]
    return events


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, model: Any, zero_optimizer: Any, bias: str):
        """``model``: the DeepSpeedEngine (or the module it wraps, when only saving and loading through it);
        ``zero_optimizer``: the engine's ZeRO optimizer (``engine.optimizer``)."""
        super().__init__(model, zero_optimizer, bias)
        self.zero: Any = zero_optimizer
        layout = zero_layout(zero_optimizer)
        if layout is None:
            raise NotImplementedError(
                f"unsupported DeepSpeed optimizer {type(zero_optimizer).__name__}; dist_lora handles ZeRO stages "
                "1, 2 and 3 (DeepSpeedZeroOptimizer, BF16_Optimizer and DeepSpeedZeroOptimizer_Stage3)"
            )
        self.stage, self._fp32_groups, self._bit16_groups = layout
        self._release: weakref.finalize | None = None  # set for an engine this backend built (wrap)

    @classmethod
    def gathers_parameters(cls, parallel):  # type: ignore[no-untyped-def]
        return parallel.zero_stage == 3

    def describe(self) -> str:
        return f"{self.name} ZeRO-{self.stage}"

    @classmethod
    def load_base(cls, parallel, name_or_path, dtype, device, *, config=None, **batch):  # type: ignore[no-untyped-def]
        """ZeRO-3 with a local base: the model is partitioned as it is constructed (``zero.Init``, through
        transformers' HfDeepSpeedConfig, under ``config``: by default the run's, :func:`ds_config`), then each rank
        fills its own partition of every tensor from the files, one tensor at a time. ZeRO-1/2 keep a whole replica
        per rank (and so does a hub model in pickle files only)."""
        weights = BaseWeights.of(name_or_path) if parallel.zero_stage == 3 else None
        if weights is None:
            return super().load_base(parallel, name_or_path, dtype, device, **batch)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        import_deepspeed()
        from deepspeed.runtime.zero.partition_parameters import Init
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations import deepspeed as hf_deepspeed

        config = config or ds_config(
            zero_stage=3,
            micro_batch_size=batch["micro_batch_size"],
            grad_accum=batch["grad_accum"],
            bf16=parallel.mixed_precision == "bf16",
            extra=parallel.deepspeed_config,
            max_grad_norm=batch.get("max_grad_norm"),
            world_size=world,
            cpu_offload=parallel.cpu_offload,
        )
        keep = HfDeepSpeedConfig(config)  # transformers builds under zero.Init while this object lives
        # After construction transformers initialises the weights module by module, each one gathered whole onto
        # every rank (initialize_weights_zero3): the whole model passes through each rank's memory only to be
        # overwritten from the files. The buffers it would also set (rotary inv_freq) are computed at construction,
        # as on the meta-device path of FSDP2, so the initialisation is skipped.
        # zero.Init also broadcasts every parameter whole from rank 0 before partitioning it, so that random inits
        # agree: the whole model over the network, for values the files replace. Partitioned without it.
        # And each module's own random init (nn.Linear's kaiming draw over the whole weight) is skipped as well.
        with (
            mock.patch.object(hf_deepspeed, "initialize_weights_zero3", lambda model: None),
            mock.patch.object(Init, "_zero_init_param", _partition_unbroadcast),
            mock.patch.object(Init, "_set_dtype", _model_dtype_unless_half(Init._set_dtype, dtype)),
            skip_weight_init(),
        ):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path), dtype=dtype)
        model._dist_lora_hf_ds_config = keep  # kept for as long as the model (generation checks it)
        # (read ahead once the model names the tensors: it may name and join them otherwise than the files)
        weights.follow(model).read_ahead(partition_of(rank, world), dtype if device.type == "cpu" else None)
        _fill_partitions(model, weights)
        release_freed_memory()
        return model, None

    @classmethod
    def wrap(
        cls, parallel, model, make_optimizer, bias, *, micro_batch_size, grad_accum, weights=None, max_grad_norm=None
    ):  # type: ignore[no-untyped-def]
        deepspeed = import_deepspeed()
        trained = [p for p in model.parameters() if p.requires_grad]
        client = make_optimizer(trained)
        config = ds_config(
            zero_stage=parallel.zero_stage,
            micro_batch_size=micro_batch_size,
            grad_accum=grad_accum,
            bf16=parallel.mixed_precision == "bf16",
            extra=parallel.deepspeed_config,
            max_grad_norm=max_grad_norm,
            world_size=torch.distributed.get_world_size(),
            adamw={name: client.defaults.get(name) for name in ADAMW_SETTINGS},  # what the JSON may repeat
            cpu_offload=parallel.cpu_offload,
            trainable=sum(getattr(p, "ds_numel", p.numel()) for p in trained),  # (ZeRO-3's: whole, not partitions)
        )
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)
        backend = cls(engine, optimizer, bias)
        # the engine goes with this backend (a dropped trainer frees its model and its device memory): without
        # this, a process that builds one engine after another keeps every one of them
        backend._release = weakref.finalize(backend, _release_engine, engine)
        backend._release.atexit = False  # at exit the process's memory goes anyway
        return backend

    @classmethod
    def recognise(cls, model, optimizer, bias):  # type: ignore[no-untyped-def]
        """A DeepSpeedEngine (its ZeRO optimizer is ``engine.optimizer``), or any module with a ZeRO optimizer
        (HF Trainer passes the PEFT model and accelerate's unwrapped optimizer)."""
        zero = model.optimizer if type(model).__name__ == "DeepSpeedEngine" else optimizer
        return cls(model, zero, bias) if zero_layout(zero) is not None else None

    def release(self) -> None:
        """Give DeepSpeed's hold on an engine this backend built back (:func:`_release_engine`): the engine no longer
        trains. Runs by itself when the backend is dropped; an engine built elsewhere (HF Trainer's) is left alone."""
        if self._release is not None:
            self._release()

    def ready(self) -> None:
        """Unlink this rank's all-reduce workspace (:func:`shm_workspace`) once every rank has mapped it: the maps
        stay valid, and the memory is freed when the last rank exits, however it exits. Every rank holds one or none
        alike (all on one node under the launcher, or not), so all of them or none take the barrier."""
        workspace = shm_workspace()
        if not os.path.exists(workspace):  # torchrun, GPUs, or unlinked already
            return
        torch.distributed.barrier()  # every rank is past DeepSpeed's communication init: each mapped the others'
        with contextlib.suppress(FileNotFoundError):
            os.unlink(workspace)

    # ------------------------------------------------------------------------------------------ training

    def backward(self, loss: torch.Tensor, *, grad_accum: int, last_micro: bool) -> None:
        self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not last_micro:
            self.model.step()  # not a boundary: DeepSpeed only counts the micro-step

    def local_grads(self) -> dict[str, torch.Tensor] | None:
        return None  # in ZeRO's partitioned buffers until the step: the trainer checks the step's global norm

    def step(self, lr: float, max_grad_norm: float | None = None) -> float:
        # the engine clips at the boundary (ds_config gradient_clipping, set from train.max_grad_norm) and
        # computes the global norm over the partitioned fp32 gradients either way
        self.set_lr(lr)
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr_groups(self) -> list[dict[str, Any]]:
        return list(self.zero.param_groups)

    # ------------------------------------------------------------------------------------------ layout

    @property
    def _inner(self) -> torch.optim.Optimizer:
        return self.zero.optimizer

    def stepping_optimizer(self) -> Any:
        return self._inner  # it steps the flat partitions; its state is keyed by them

    def _flat_groups(self) -> list[torch.Tensor]:
        return list(getattr(self.zero, self._fp32_groups))

    def _group_of(self, p: Any) -> int:
        if self.stage == 3:
            return int(self.zero.grad_position[self.zero.get_param_id(p)][0])
        if not hasattr(self, "_groups"):
            groups = getattr(self.zero, self._bit16_groups)
            self._groups = {id(q): i for i, group in enumerate(groups) for q in group}
        return self._groups[id(p)]

    def _range(self, p: Any) -> tuple[int, int, int]:
        """(offset into the flattened full tensor, numel held here, offset into the flat group tensor)."""
        if self.stage == 3:
            _, dest, part = (int(x) for x in self.zero.grad_position[self.zero.get_param_id(p)])
            offset = self.rank * part
            return offset, max(0, min(part, p.ds_numel - offset)), dest
        m = p._hp_mapping
        if m is None:
            return 0, 0, 0
        return (
            int(m.lp_fragment_address.start),
            int(m.lp_fragment_address.numel),
            int(m.hp_fragment_address.start),
        )

    def _state(self, group: int) -> dict[str, torch.Tensor]:
        return self._inner.state.get(self._flat_groups()[group], {})

    # ------------------------------------------------------------------------------------------ save

    def _pieces(self, groups: list[dict[str, torch.Tensor]], steps: list[float | None]) -> list[LocalPiece]:
        """Cut every adapter tensor's range out of per-group flat tensors (``groups[g][field]``)."""
        pieces = []
        params: dict[str, Any] = self.adapter()
        for key, p in params.items():
            g = self._group_of(p)
            offset, numel, dest = self._range(p)
            fields = {name: flat.narrow(0, dest, numel).detach().float() for name, flat in groups[g].items()}
            shape = torch.Size(p.ds_shape) if self.stage == 3 else p.shape
            pieces.append(LocalPiece(key, shape, offset, fields, steps[g]))
        return pieces

    def _flat_state(self) -> tuple[list[dict[str, torch.Tensor]], list[float | None]]:
        """Each flat group's fp32 master and the optimizer's element-wise state by field, and its step count (None
        before the first step)."""
        groups, steps = [], []
        for flat in self._flat_groups():
            state = self._inner.state.get(flat, {})
            groups.append({WEIGHT_FIELD: flat, **elementwise_state(self._inner, state, flat)})
            steps.append(float(state.get("step", 0.0)) if state else None)
        return groups, steps

    def local_pieces(self) -> list[LocalPiece]:
        return self._pieces(*self._flat_state())

    def snapshot(self, staging: Staging) -> list[LocalPiece]:
        # The flat groups hold only trainable tensors (the adapter): copy them whole, then cut per tensor.
        groups, steps = self._flat_state()
        copies = iter(staging.copy([t for fields in groups for t in fields.values()]))
        return self._pieces([{name: next(copies) for name in fields} for fields in groups], steps)

    # ------------------------------------------------------------------------------------------ load

    def prepare_load(self, fields: list[str]) -> None:
        created = False
        for flat in self._flat_groups():
            state = self._inner.state[flat]
            if fields and "step" not in state:
                state["step"] = torch.tensor(0.0)
            for name in fields:
                if name not in state:
                    state[name] = torch.zeros_like(flat)
                    created = True
        if created and self.stage in (1, 2):
            # re-link each parameter's fragment views to the state tensors just created
            self.zero._hp_optimizer_states_linked = False
            self.zero._lazy_init_hp_params_optimizer_state()

    def load_full(self, p: Any, full: dict[str, torch.Tensor], step: float | None) -> None:
        g = self._group_of(p)
        offset, numel, dest = self._range(p)
        flat = self._flat_groups()[g]
        state = self._state(g)
        with torch.no_grad():
            for name, value in full.items():
                target = flat if name == WEIGHT_FIELD else state[name]
                piece = value.reshape(-1).narrow(0, offset, numel)
                target.narrow(0, dest, numel).copy_(piece.to(target))
            if step is not None and "step" in state:
                state["step"].fill_(step)
            # the model's own copy of the weights is separate from the fp32 master
            weight = full[WEIGHT_FIELD]
            if self.stage == 3:
                part = p.ds_tensor.numel()
                padded = torch.zeros(part * self.world_size, dtype=weight.dtype)
                padded[: weight.numel()] = weight.reshape(-1)
                p.ds_tensor.copy_(padded.narrow(0, self.rank * part, part).to(p.ds_tensor))
                if p.numel() == math.prod(p.ds_shape):  # currently gathered (persistent): keep it in step
                    p.data.copy_(weight.view(p.ds_shape).to(p.data))
            else:
                p.data.copy_(weight.view_as(p).to(p.data))
