"""save_checkpoint / load_checkpoint: the two collectives the trainer uses, for any training loop; load_adapter:
an adapter's weights alone (a step's, or one PEFT saved), to start a new run from; load_model: a step over a fresh
base, in one process; load_sharded: the trainer's FSDP2 or ZeRO-3 model (the base loaded shard by shard, LoRA
applied), for a loop of one's own.

The loads and saves are collectives when torch.distributed is initialized: every rank calls them, rank 0 does the
I/O, and an error on rank 0 is raised on every rank (never a hang). With one process they are plain calls.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_lora.agree import on_rank0
from dist_lora.backends import Backend, attach
from dist_lora.backends.base import expected_state_fields
from dist_lora.checkpoint import (
    BEST_ALIAS,
    CheckpointError,
    LoadedStep,
    best_evaluated_step,
    check_no_newer_steps,
    is_step_url,
    newest_verified_step,
    no_step_error,
    read_newest_step,
    read_peft_adapter,
    read_step,
)
from dist_lora.checkpointer import Checkpointer
from dist_lora.config import ZERO3_COMPILE, CheckpointConfig, ConfigError, LoraConfig, ParallelConfig
from dist_lora.constants import ADAPTER_CONFIG_NAME, WEIGHT_FIELD
from dist_lora.faults import failpoint
from dist_lora.gather import broadcast_adapter
from dist_lora.lora import (
    AdapterError,
    adapter_aliases,
    adapter_parameters,
    base_fingerprint,
    check_base,
    check_bias_mode,
    config_mismatches,
    full_shape,
    infer_bias_mode,
    lora_overrides,
    mark_only_lora_as_trainable,
)
from dist_lora.storage import RetryPolicy, Storage

log = logging.getLogger(__name__)


@dataclass
class _Saver:
    """What :func:`save_checkpoint` keeps per model: its Backend view (piece layout, bias mode) for one optimizer,
    and one Checkpointer per (dir, save options)."""

    optimizer: weakref.ref | None
    backend: Backend
    checkpointers: dict[tuple, Checkpointer] = field(default_factory=dict)


_SAVER_ATTR = "_dist_lora_saver"
"""The model's attribute that holds its :class:`_Saver`. On the model, not in a module-level mapping: the saver's
Backend view refers to the model, so a mapping (even a WeakKeyDictionary, whose values are strong) would keep every
model ever saved alive; on the model, the two are one cycle that the collector frees with the model."""


def _saver(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> _Saver:
    saver = model.__dict__.get(_SAVER_ATTR)
    if saver is None or (saver.optimizer() if saver.optimizer else None) is not optimizer:
        ref = weakref.ref(optimizer) if optimizer is not None else None
        saver = _Saver(ref, attach(model, optimizer, infer_bias_mode(model)))
        model.__dict__[_SAVER_ATTR] = saver  # (not a parameter, buffer or submodule: no state dict sees it)
    return saver


def save_checkpoint(
    model: nn.Module,
    dir: str,
    *,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    trainer_state: dict[str, Any] | None = None,
    keep_last: int | None = None,
    storage_options: dict[str, Any] | None = None,
    bucket_mb: float = 32.0,
    backend: Backend | None = None,
) -> str:
    """Save the adapter (and optimizer state) as ``<dir>/step-<step>/``; returns the step's URL once committed.

    Collective: every rank must call. Only the adapter tensors and their Adam state are gathered to rank 0, in
    buckets; rank 0 writes and commits the step; one all-reduce agrees on the outcome, and a failure on any rank
    is raised on every rank. The Backend view and the Checkpointer are made on the first call for a (model,
    optimizer, dir) and reused after it (the piece layout is gathered once). For saves that overlap training, use
    :class:`dist_lora.checkpointer.Checkpointer` with ``async_save=True``.
    """
    saver = _saver(model, optimizer)
    key = (dir, keep_last, json.dumps(storage_options or {}, sort_keys=True, default=repr), bucket_mb)
    if key not in saver.checkpointers:
        config = CheckpointConfig(
            dir=dir,
            keep_last=keep_last,
            storage_options=dict(storage_options or {}),
            bucket_mb=bucket_mb,
            async_save=False,
        )
        saver.checkpointers[key] = Checkpointer(config)
    checkpointer = saver.checkpointers[key]
    backend = backend or saver.backend
    url = checkpointer.save(backend, step=step, trainer_state=trainer_state)
    assert url is not None  # on_error="raise": a failure raised above
    return url


def _untied(loaded: LoadedStep, aliases: dict[str, str]) -> str | None:
    """Drop the tied copies of a step's tensors that the model holds once (``aliases``); names the first pair the
    step holds as two different tensors, or None."""
    weights = loaded.state.weights
    for alias, key in aliases.items():
        if alias in weights and key in weights:
            if not torch.equal(weights[alias], weights[key]):
                return f"{alias} and {key}"
            del weights[alias]
    return None


def adapter_mismatches(expected: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]]) -> list[str]:
    """How an adapter's tensors (``got``: key -> shape) differ from those the model's LoRA layers hold
    (``expected``): a line for the missing keys, one for the unexpected keys, one per shape that differs."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    lines = [f"missing in checkpoint: {missing}"] if missing else []
    lines += [f"unexpected in checkpoint: {unexpected}"] if unexpected else []
    lines += [
        f"shape mismatch: {k}: checkpoint {list(got[k])}, model {list(expected[k])}"
        for k in sorted(set(got) & set(expected))
        if list(got[k]) != list(expected[k])
    ]
    return lines


def _check_step_fits(loaded: LoadedStep, backend: Backend, with_optimizer: bool) -> dict[str, Any]:
    """Strict checks of a verified step against the model; returns the broadcast header. Rank 0 only."""
    manifest, state = loaded.manifest, loaded.state
    bias = str(manifest.get("bias"))
    check_bias_mode(backend.model, bias)
    if loaded.verified:  # (an adapter PEFT saved has no fingerprint of its base: its keys and shapes are checked)
        check_base(loaded.url, manifest.get("base_fingerprint", {}), base_fingerprint(backend.model), "load the base")
    expected = {k: full_shape(p) for k, p in adapter_parameters(backend.model, bias).items()}
    untied = _untied(loaded, adapter_aliases(backend.model))
    if untied:
        raise AdapterError(
            f"{loaded.url} holds {untied} as different tensors, which the model trains as one (PEFT's "
            "ensure_weight_tying): the step was trained without it; load it with lora.ensure_weight_tying: false"
        )
    mismatches = adapter_mismatches(expected, {k: t.shape for k, t in state.weights.items()})
    if mismatches:
        lines = [f"{loaded.url} does not match the model's adapter (bias={bias!r}):"]
        lines += [f"  {line}" for line in mismatches]
        overrides = lora_overrides(backend.model, loaded.adapter_config)
        lines.append(
            f"  apply LoRA as the checkpoint's adapter_config.json says: {' '.join(overrides)}"
            if overrides
            else "  check lora.r, lora.target_modules and lora.bias against the checkpoint's adapter_config.json"
        )
        raise AdapterError("\n".join(lines))
    differs = config_mismatches(backend.model, loaded.adapter_config)
    if differs:
        raise AdapterError(
            f"{loaded.url} fits the model's adapter in keys and shapes, but the model's LoRA layers would compute "
            "it otherwise than the layers that trained it:\n  "
            + "\n  ".join(differs)
            + "\n  apply LoRA with the checkpoint's lora_alpha, use_rslora and alpha_pattern, as its "
            "adapter_config.json says: "
            + (
                " ".join(lora_overrides(backend.model, loaded.adapter_config))
                or "lora.alpha, lora.use_rslora, lora.alpha_pattern"
            )
        )
    fields = [WEIGHT_FIELD]
    steps: dict[str, float] = {}
    if with_optimizer:
        names, steps = _check_optimizer_state(loaded, backend, expected)
        fields += names
    return {
        "url": loaded.url,
        "bias": bias,
        "keys": list(expected),
        "shapes": {k: list(s) for k, s in expected.items()},
        "fields": fields,
        "steps": steps,
        "trainer_state": loaded.trainer_state,
        "verified": loaded.verified,
    }


def _check_optimizer_state(
    loaded: LoadedStep, backend: Backend, expected: dict[str, torch.Size]
) -> tuple[list[str], dict[str, float]]:
    """The step's optimizer state checked against the adapter's tensors (``expected``: their full shapes) and the
    optimizer that will take it: its field names and each tensor's step. Rank 0 only."""
    state, manifest = loaded.state, loaded.manifest
    steps: dict[str, float] = {}
    if not state.optim and manifest.get("optimizer"):  # saved before the optimizer's first step: no state to restore
        log.info("%s was saved before its optimizer's first step: the optimizer starts without state", loaded.url)
        return [], steps
    if not state.optim:
        raise CheckpointError(
            f"{loaded.url} holds no optimizer state (optimizer.safetensors), as it was saved without an optimizer; "
            "load it without one (the optimizer's state then starts afresh)"
        )
    names = sorted({f for entry in state.optim.values() for f in entry} - {"step"})  # every tensor has them all
    for k, shape in expected.items():
        entry = state.optim.get(k, {})
        bad = [f for f in names if f not in entry or entry[f].shape != shape]
        if bad or "step" not in entry:
            raise CheckpointError(
                f"{loaded.url}: optimizer state of {k} lacks or misshapes {bad or ['step']} "
                f"(expected {names} of shape {list(shape)}, and step)"
            )
        steps[k] = float(entry["step"])
    optimizer = backend.stepping_optimizer()
    keeps = expected_state_fields(optimizer)
    if keeps is not None and keeps != set(names):
        raise CheckpointError(
            f"{loaded.url} holds the optimizer state fields {names}, where the optimizer given "
            f"({type(optimizer).__name__}) keeps {sorted(keeps)}: load it into the optimizer it was saved with "
            f"({manifest.get('optimizer', 'its class is not recorded')}, with the same settings such as "
            "amsgrad), or without an optimizer (its state then starts afresh)"
        )
    saved, given = manifest.get("optimizer"), type(optimizer).__name__
    if saved and saved != given:
        log.warning(
            "%s was saved with %s and is loaded into %s: its state (%s) is restored as saved, which %s must "
            "read under those names",
            loaded.url,
            saved,
            given,
            ", ".join(names),
            given,
        )
    return names, steps


def _best_alias(path: str, storage_options: dict[str, Any] | None, retry: RetryPolicy | None) -> Storage | None:
    """``DIR/best``, where DIR holds no entry of that name: DIR's best-evaluated step
    (:func:`dist_lora.checkpoint.best_evaluated_step`); None for any other path."""
    parent, _, last = path.rstrip("/").rpartition("/")
    if last != BEST_ALIAS or not parent or Storage(path, storage_options, retry).listdir():
        return None
    return best_evaluated_step(Storage(parent, storage_options, retry))


def resolve_step(path: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None) -> Storage:
    """A step URL as given, the newest committed and verified step of a checkpoint dir, or (``DIR/best``) DIR's
    best-evaluated step."""
    storage = Storage(path, storage_options, retry)
    if is_step_url(storage):
        return storage
    best = _best_alias(path, storage_options, retry)
    if best is not None:
        return best
    step = newest_verified_step(storage)
    if step is None:
        raise no_step_error(storage)
    return step


def _read(path: str, storage_options: dict[str, Any] | None, retry: RetryPolicy | None) -> LoadedStep | None:
    """Rank 0: one step as given (``DIR/best``: DIR's best-evaluated one), or a checkpoint dir's newest step that
    verifies (each file read and hashed once; None when the dir has none)."""
    failpoint("load.read")
    storage = Storage(path, storage_options, retry)
    if is_step_url(storage):
        return read_step(storage)
    best = _best_alias(path, storage_options, retry)
    return read_step(best) if best is not None else read_newest_step(storage)


def load_checkpoint(
    model: nn.Module,
    path: str,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    storage_options: dict[str, Any] | None = None,
    bucket_mb: float = 32.0,
    backend: Backend | None = None,
    retry: RetryPolicy | None = None,
    missing_ok: bool = False,
) -> dict[str, Any] | None:
    """Load a step (or a checkpoint dir's newest verified step) into the model, and the optimizer if given.

    Collective: every rank must call. Rank 0 reads the step, checks every sha256, the base fingerprint, the bias
    mode and every key and shape (strictly: nothing missing, nothing extra); then the tensors are broadcast in
    buckets of ``bucket_mb`` and each rank keeps its shard. Any failure on rank 0 is raised on every rank (same
    class, same message). Returns the trainer state, plus ``checkpoint_url``; ``missing_ok``: None when ``path``
    is a checkpoint dir without any verified step.
    """

    def read() -> LoadedStep | None:
        loaded = _read(path, storage_options, retry)
        if loaded is None and not missing_ok:
            raise no_step_error(Storage(path, storage_options, retry))
        return loaded

    header = _load(model, read, optimizer, bucket_mb, backend)
    return None if header is None else {**header["trainer_state"], "checkpoint_url": header["url"]}


def load_adapter(
    model: nn.Module,
    path: str,
    *,
    storage_options: dict[str, Any] | None = None,
    bucket_mb: float = 32.0,
    backend: Backend | None = None,
    retry: RetryPolicy | None = None,
    what: str = "the adapter",
) -> dict[str, Any]:
    """Load an adapter's weights alone into the model: a fine-tune that starts from a trained adapter, with an
    optimizer, a schedule and a step count of its own (``lora.init_from``). ``path``: a dist_lora step, a
    checkpoint dir (its newest verified step), ``DIR/best``, a directory PEFT's ``save_pretrained`` wrote, or a
    PEFT adapter's hub id (its snapshot in the Hugging Face cache, downloaded where missing); PEFT's are read
    unverified: they have no manifest.

    Collective, at any world size and on any engine, as :func:`load_checkpoint`; checked as it checks (bias mode,
    every key and shape, the LoRA scaling; a dist_lora step also its sha256 and its base's fingerprint). Returns
    ``{"url", "step"}``: the step loaded, and the step of the run that saved it (None for PEFT's), ``"verified"``.
    ``what``: the setting that named ``path``, for its errors (the trainer's ``lora.init_from``).
    """
    header = _load(model, lambda: read_adapter(path, storage_options, retry, what), None, bucket_mb, backend)
    assert header is not None  # (read returns a step or raises)
    return {"url": header["url"], "step": header["trainer_state"].get("step"), "verified": header["verified"]}


def read_adapter(
    path: str, storage_options: dict[str, Any] | None, retry: RetryPolicy | None, what: str = "the adapter"
) -> LoadedStep:
    """Rank 0: the step :func:`load_adapter` loads (a dist_lora step as :func:`load_checkpoint` finds it, else an
    adapter directory PEFT wrote, or a hub adapter's snapshot), or an error saying what ``path`` holds instead;
    ``what``: the setting that named it, for the error."""
    from dist_lora.model import hub_adapter

    storage = Storage(path, storage_options, retry)
    loaded = _read(path, storage_options, retry) or read_peft_adapter(storage)
    if loaded is not None:
        return loaded
    snapshot = hub_adapter(path, what)  # (nothing there: a hub id? DIR/best and relative paths were tried first)
    if snapshot is None:
        raise CheckpointError(f"{no_step_error(storage)}; or pass a directory PEFT's save_pretrained wrote")
    loaded = read_peft_adapter(Storage(str(snapshot)))
    if loaded is None:
        raise CheckpointError(f"the hub's {path} holds no {ADAPTER_CONFIG_NAME}: it is not a PEFT adapter")
    loaded.url = f"{path}@{snapshot.name}"  # (the hub id at the commit read)
    return loaded


def _load(
    model: nn.Module,
    read: Callable[[], LoadedStep | None],
    optimizer: torch.optim.Optimizer | None,
    bucket_mb: float,
    backend: Backend | None,
) -> dict[str, Any] | None:
    """Collective: rank 0 reads a step (``read``: None for none) and checks it against the model
    (:func:`_check_step_fits`), then every rank keeps its shard of the broadcast tensors; the header, or None."""
    if backend is None:
        backend = attach(model, optimizer, infer_bias_mode(model))
    loaded: LoadedStep | None = None

    def read_and_check() -> dict[str, Any] | None:
        nonlocal loaded
        loaded = read()
        return None if loaded is None else _check_step_fits(loaded, backend, optimizer is not None)

    header = on_rank0(read_and_check, share=True)
    if header is None:
        return None
    backend.bias = header["bias"]
    backend.prepare_load(header["fields"][1:])
    broadcast_adapter(backend, loaded.state if loaded else None, header, bucket_bytes=int(bucket_mb * 2**20))
    backend.finish_load()
    log.info("loaded %s", header["url"])
    return header


def resume_checkpoint(
    model: nn.Module,
    resume: str | None,
    dir: str,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    storage_options: dict[str, Any] | None = None,
    bucket_mb: float = 32.0,
    backend: Backend | None = None,
    retry: RetryPolicy | None = None,
    writes: bool = True,
    loaded: LoadedStep | None = None,
) -> dict[str, Any] | None:
    """Collective: resume as ``checkpoint.resume`` says. "none" (or None): nothing, returns None; "auto": the
    newest committed step of ``dir`` that verifies (None if there is none; newer broken ones are skipped with a
    warning); else one step's URL. Returns :func:`load_checkpoint`'s trainer state.

    The run saves into ``dir`` from here on, so a committed step of ``dir`` after the one it starts from (0, or
    the step resumed) is another run's: raised on every rank now, before any training, rather than at the first
    save (:func:`~dist_lora.checkpoint.check_no_newer_steps`). A run that ``writes`` nothing (an evaluation) is
    not checked so, and may name any adapter :func:`load_adapter` takes: an adapter PEFT saved has no run behind
    it, so its state is ``{"checkpoint_url"}`` alone; ``loaded``: that adapter as rank 0 already read it
    (:func:`read_adapter`), loaded without reading it again."""
    if resume in (None, "", "none"):
        state = None
    elif resume != "auto" and not writes:  # (an evaluation: a step, or an adapter PEFT saved)
        header = _load(
            model,
            lambda: (
                loaded if loaded is not None else read_adapter(str(resume), storage_options, retry, "checkpoint.resume")
            ),
            optimizer,
            bucket_mb,
            backend,
        )
        assert header is not None  # (read_adapter returns a step or raises)
        return {**header["trainer_state"], "checkpoint_url": header["url"]}
    else:
        auto = resume == "auto"
        state = load_checkpoint(
            model,
            dir if auto else str(resume),
            optimizer=optimizer,
            storage_options=storage_options,
            bucket_mb=bucket_mb,
            backend=backend,
            retry=retry,
            missing_ok=auto,
        )
    start = int(state["step"]) if state is not None else 0
    if writes:
        on_rank0(lambda: check_no_newer_steps(Storage(dir, storage_options, retry), start))
    return state


def saved_revision(adapter_config: dict[str, Any], base: str) -> str | None:
    """The hub commit a step was trained on (PEFT's ``revision`` in its adapter_config.json), where ``base`` is the
    base it names; None for another base (an override) or a step saved without one."""
    return adapter_config.get("revision") if base == adapter_config.get("base_model_name_or_path") else None


def load_model(
    path: str,
    *,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    is_trainable: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> nn.Module:
    """A fresh base from ``from_pretrained``, LoRA applied from the step's adapter_config.json, then the adapter.

    ``path``: a step, a checkpoint dir (its newest verified step), ``DIR/best``, or an adapter PEFT saved (a
    directory, an fsspec URL or a hub id: :func:`read_adapter`). ``base`` overrides the base model path the
    adapter names. A hub base loads at the commit the step was trained on (``revision`` in adapter_config.json).
    Single process.
    """
    return model_of(read_adapter(path, storage_options, None), base=base, dtype=dtype, is_trainable=is_trainable)


def model_of(
    loaded: LoadedStep, *, base: str | None = None, dtype: torch.dtype | None = None, is_trainable: bool = False
) -> nn.Module:
    """:func:`load_model` of a step already read (:func:`read_adapter`)."""
    import peft

    from dist_lora.model import load_base, resolve_model_path

    adapter_config = dict(loaded.adapter_config)
    base_given = bool(base)
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"{loaded.url} names no base model; pass base=...")
    what = "base" if base_given else f"base_model_name_or_path of {loaded.url}/adapter_config.json (override: --base)"
    model = load_base(resolve_model_path(base, what), dtype, what, revision=saved_revision(adapter_config, base))
    adapter_config["inference_mode"] = False
    adapter_config["base_model_name_or_path"] = model.name_or_path  # (the base loaded: else PEFT warns of a rename)
    config = peft.PeftConfig.from_peft_type(**adapter_config)
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as e:  # (PEFT: no module of the base matches the adapter's targets)
        raise AdapterError(
            f"{loaded.url} was trained over another model than {base} ({what}): {str(e).rstrip('.')}; load it "
            "over its own base"
        ) from e
    mark_only_lora_as_trainable(model, loaded.manifest["bias"])
    _load(model, lambda: loaded, None, 32.0, None)  # (read once, above)
    if not is_trainable:
        model.eval()
        model.requires_grad_(False)
    return model


def load_sharded(
    name_or_path: str,
    lora: LoraConfig,
    *,
    parallel: ParallelConfig | None = None,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    seed: int = 0,
    activation_checkpointing: bool = False,
    activation_checkpointing_every: int = 1,
    attn_implementation: str | None = None,
    loss_chunk_tokens: int = 1024,
    compile: bool = False,
) -> nn.Module:
    """Collective: the model the trainer trains on FSDP2 or ZeRO-3, for a training loop of one's own; no rank ever
    holds the whole base. LoRA's adapter is drawn from ``torch.manual_seed(seed)``, the same on every rank, at any
    world size and on either engine. Each rank's share goes to the current CUDA device (``torch.cuda.set_device``
    first) or the CPU. ``name_or_path``: a ``save_pretrained`` directory or a hub id (its snapshot, at ``revision``).

    - ``parallel.backend="fsdp"`` (the default): the base is built on the meta device, LoRA applied, ``fully_shard``
      applied to each block and to the model as ``parallel`` says (HSDP, bf16 mixed precision, resharding, prefetch,
      ``keep_base_gathered``), then each rank reads only its own rows from the safetensors files. Returns the
      sharded PEFT model; build the optimizer over ``[p for p in model.parameters() if p.requires_grad]``.
    - ``parallel.backend="deepspeed"``, ``zero_stage=3``: the base is partitioned as it is constructed
      (``zero.Init``) and each rank fills its own partition from the files, then LoRA is applied. Returns the PEFT
      model for ``deepspeed.initialize``, which must be given a ZeRO-3 config; ``parallel.deepspeed_config`` names
      that config's JSON, so that construction reads the settings it shares with the engine (parameter offload).

    ``attn_implementation``: the attention kernel, as ``from_pretrained``'s (default: transformers' choice).
    ``loss_chunk_tokens``: the model's causal LM loss computed this many tokens at a time, as the trainer's
    (:mod:`dist_lora.loss`: transformers' values, never a float32 copy of all the logits); 0: transformers' own.
    ``compile``: ``torch.compile`` each transformer block in place (:func:`dist_lora.model.compile_blocks`).
    ``activation_checkpointing``: recompute the blocks' activations in backward, of every block or (with
    ``activation_checkpointing_every`` N) of the first of every N. ``save_checkpoint`` and ``load_checkpoint``
    take the model (FSDP2) or the engine (ZeRO-3) as they are."""
    import torch.distributed as dist

    from dist_lora.backends.deepspeed import DeepSpeedBackend
    from dist_lora.backends.deepspeed_config import construction_config
    from dist_lora.backends.fsdp import FSDPBackend, mark_sharded
    from dist_lora.model import (
        apply_lora_seeded,
        base_directory,
        collection_paused,
        compile_blocks,
        compute_device,
        prepare_base,
    )

    parallel = parallel or ParallelConfig(backend="fsdp")
    zero3 = parallel.backend == "deepspeed" and parallel.zero_stage == 3
    if parallel.backend != "fsdp" and not zero3:
        given = f"{parallel.backend!r}" + (f" (ZeRO-{parallel.zero_stage})" if parallel.backend == "deepspeed" else "")
        raise ConfigError(
            f"load_sharded builds FSDP2 and ZeRO-3 models, each rank holding a shard of the base; parallel.backend is "
            f"{given}, which holds a whole replica per rank: pass ParallelConfig(backend='fsdp', ...) or "
            "ParallelConfig(backend='deepspeed', zero_stage=3, ...), or load the base with from_pretrained and call "
            "apply_lora"
        )
    if zero3:
        if compile:
            raise ConfigError(f"compile {ZERO3_COMPILE}")
        if parallel.cpu_offload:
            raise ConfigError(
                "load_sharded on ZeRO-3 constructs the model under your DeepSpeed JSON, which your "
                "deepspeed.initialize reads too: offload there (zero_optimization.offload_param and "
                "offload_optimizer, device cpu), and leave parallel.cpu_offload false"
            )
        if not parallel.deepspeed_config:
            raise ConfigError(
                "load_sharded on ZeRO-3 needs parallel.deepspeed_config: the path of the DeepSpeed JSON your "
                "deepspeed.initialize takes (the model is constructed under it, as with transformers' "
                "HfDeepSpeedConfig, and both must say ZeRO-3 and the same precision)"
            )
        try:
            config = construction_config(parallel.deepspeed_config, bf16=parallel.mixed_precision == "bf16")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not dist.is_initialized():
        raise RuntimeError(
            "load_sharded is a collective over the process group: call torch.distributed.init_process_group() on "
            "every rank first (torchrun sets the environment it reads)"
        )
    directory = base_directory(name_or_path, revision=revision)
    hub = directory not in (None, name_or_path)  # a hub id: its snapshot, named by the commit every step records
    with collection_paused():
        engine = DeepSpeedBackend if zero3 else FSDPBackend
        construction = {"config": config} if zero3 else {}  # ZeRO-3's: the loop's JSON
        base, weights = engine.load_base(
            parallel, directory or name_or_path, dtype, compute_device(), revision=revision, **construction
        )
        if hub:
            base.name_or_path = base.config.name_or_path = name_or_path
        # (no key-value cache while training; generate(use_cache=True) still uses one)
        prepare_base(
            base,
            attn_implementation,
            loss_chunk_tokens,
            activation_checkpointing_every if activation_checkpointing else 0,
            ("attn_implementation", "loss_chunk_tokens"),
        )
        model = apply_lora_seeded(base, lora, name_or_path, Path(str(directory)).name if hub else revision, seed)
        if not zero3:  # (ZeRO-3's engine is the loop's own: deepspeed.initialize with its optimizer and config)
            model = FSDPBackend.wrap(
                parallel, model, lambda params: None, lora.bias, micro_batch_size=1, grad_accum=1, weights=weights
            ).model
            mark_sharded(model)  # (HF's Trainer takes it as it is)
        if compile:  # after fully_shard, which subclasses each block: the forward compiled is the final class's
            compile_blocks(model, what="compile")
    return model
