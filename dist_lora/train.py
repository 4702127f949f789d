"""The training loop: build, wrap, (resume), loop, save. Backend-agnostic; reads top to bottom."""

from __future__ import annotations

import contextlib
import datetime
import gc
import glob
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, overload

import torch

from dist_lora import backends
from dist_lora.agree import is_agreed, on_rank0
from dist_lora.api import load_adapter, read_adapter, resume_checkpoint
from dist_lora.checkpoint import LoadedStep, best_first, improves, list_steps
from dist_lora.checkpointer import Checkpointer
from dist_lora.config import (
    ConfigError,
    LoraConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    best_eval_set,
    config_changes,
    config_from_dict,
    config_to_dict,
)
from dist_lora.constants import ENV_WORLD_SIZE
from dist_lora.data import check_packing, check_vocab, draw_seed, micro_place, prepare_data
from dist_lora.distributed import init_distributed, shutdown, step_consensus, sum_over_ranks
from dist_lora.guard import FirstNonFinite, check_first_step, check_step
from dist_lora.logs import quiet_third_party
from dist_lora.lora import loraplus_groups
from dist_lora.loss import correct_predictions
from dist_lora.metrics import MetricsLog, step_peak_memory
from dist_lora.model import (
    DTYPES,
    apply_lora_seeded,
    base_directory,
    collection_paused,
    compile_blocks,
    context_length,
    load_tokenizer,
    prepare_base,
    resolve_model_path,
    return_large_blocks_to_the_os,
)
from dist_lora.preempt import JobClock, StopRequest
from dist_lora.quantize import Plan, check_and_log, quantize_base

log = logging.getLogger(__name__)


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then ``lr_schedule``: a cosine or linear decay to
    ``min_lr_ratio`` of it at ``max_steps``, constant, or (wsd) constant until the last ``decay_ratio`` of the
    steps, then a cosine decay to ``min_lr_ratio`` of it at ``max_steps``."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    start = t.warmup_steps  # where the decay starts
    if t.lr_schedule == "wsd":
        start = max(start, t.max_steps - math.ceil(t.decay_ratio * t.max_steps))
    progress = min(1.0, max(0.0, (step - start) / max(1, t.max_steps - start)))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    left = {"cosine": cosine, "wsd": cosine, "linear": 1 - progress, "constant": 1.0}
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * left[t.lr_schedule])


@overload
def _local_abs(path: str) -> str: ...
@overload
def _local_abs(path: str | None) -> str | None: ...
def _local_abs(path: str | None) -> str | None:
    """An existing local path, or a glob pattern that matches local files, made absolute (the config saved with each
    step works from anywhere); anything else (a hub id, a Jinja template, None) unchanged."""
    return os.path.abspath(path) if path and (os.path.exists(path) or glob.glob(path, recursive=True)) else path


@overload
def _local_abs_each(paths: str | list[str]) -> str | list[str]: ...
@overload
def _local_abs_each(paths: str | list[str] | None) -> str | list[str] | None: ...
def _local_abs_each(paths: str | list[str] | None) -> str | list[str] | None:
    """:func:`_local_abs` of one path or of each in a list."""
    return [_local_abs(p) for p in paths] if isinstance(paths, list) else _local_abs(paths)


def _local_abs_sets(
    paths: str | list[str] | dict[str, str | list[str] | dict[str, Any]] | None,
) -> str | list[str] | dict[str, str | list[str] | dict[str, Any]] | None:
    """:func:`_local_abs_each` of ``data.eval_path``: of each named set's sources too."""
    if not isinstance(paths, dict):
        return _local_abs_each(paths)
    return {
        name: {**value, "path": _local_abs_each(value["path"])} if isinstance(value, dict) else _local_abs_each(value)
        for name, value in paths.items()
    }


def grad_accum_steps(t: TrainConfig, world: int) -> int:
    per_step = t.micro_batch_size * world
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size} x world size {world} = {per_step}; pick a global batch that is a multiple of "
            f"{per_step}, or change micro_batch_size"
        )
    return t.global_batch_size // per_step


def resolved_model(model: ModelConfig) -> ModelConfig:
    """``model`` with a local path made absolute (so that the config saved with each step and adapter_config.json
    work from anywhere); a revision of a local directory refused."""
    model = replace(model, name_or_path=resolve_model_path(model.name_or_path))
    if model.revision is not None and os.path.isdir(model.name_or_path):
        raise ConfigError(
            f"model.revision={model.revision} picks a version of a hub model, and model.name_or_path "
            f"{model.name_or_path} is a local directory, which has none: drop model.revision"
        )
    return model


def check_seq_len(cfg: RunConfig) -> None:
    """Refuse rows longer than the positions a base with learned ones has (GPT-2's position table)."""
    limit = context_length(cfg.model.name_or_path, cfg.model.revision)
    if limit is not None and cfg.data.seq_len > limit:
        raise ConfigError(
            f"data.seq_len {cfg.data.seq_len} is longer than the {limit} positions {cfg.model.name_or_path} "
            f"learned (max_position_embeddings in its config.json): set data.seq_len to {limit} or less"
        )


def adamw(model: torch.nn.Module, params: list[torch.nn.Parameter], t: TrainConfig) -> torch.optim.Optimizer:
    """The trainer's optimizer over ``params``, the trainable tensors of ``model``: AdamW with ``train``'s settings,
    in LoRA+'s parameter groups when ``train.loraplus_lr_ratio`` is set."""
    if t.loraplus_lr_ratio is None:
        return torch.optim.AdamW(params, **t.adamw())
    groups = loraplus_groups(
        model,
        params,
        lr=t.lr,
        ratio=t.loraplus_lr_ratio,
        embedding_lr=t.loraplus_lr_embedding,
        weight_decay=t.weight_decay,
    )
    return torch.optim.AdamW(groups, **t.adamw())


def check_launch(cfg: RunConfig) -> None:
    """Refuse the single backend on several ranks (the launcher's WORLD_SIZE): before any process group."""
    launched = int(os.environ.get(ENV_WORLD_SIZE, "1"))
    if cfg.parallel.backend == "single" and launched > 1:
        raise ConfigError(
            f"parallel.backend is single (the default), which trains in one process, but this run was launched on "
            f"{launched} ranks: each would train its own copy on its share of every batch, never synced. Set "
            "parallel.backend to fsdp, deepspeed or ddp, or start one process"
        )


def schedule(t: TrainConfig, rows: int, *, warns: bool = True) -> TrainConfig:
    """``t`` with the run's length and warm-up in steps: ``max_steps`` from ``epochs`` (enough global batches to
    see every one of ``rows`` training rows ``epochs`` times; the last may run into the next pass, as a step is
    always a whole global batch), ``warmup_steps`` from ``warmup_ratio`` (ceil, as HF Trainer). ``warns``: say so
    where the warm-up takes the whole run (rank 0's)."""
    if t.epochs is not None:
        steps = max(1, math.ceil(t.epochs * rows / t.global_batch_size))
        log.info(
            "train.epochs=%g over %d rows in global batches of %d: %d steps", t.epochs, rows, t.global_batch_size, steps
        )
        if t.stop_at_step is not None and t.stop_at_step > steps:
            raise ConfigError(
                f"train.stop_at_step={t.stop_at_step} is past the run's end: train.epochs={t.epochs:g} over {rows} "
                f"rows in global batches of {t.global_batch_size} is {steps} steps; set train.stop_at_step to "
                f"{steps} or less"
            )
        t = replace(t, max_steps=steps)
    if t.warmup_ratio:
        t = replace(t, warmup_steps=math.ceil(t.warmup_ratio * t.max_steps))
    if warns and t.warmup_steps >= t.max_steps:
        log.warning(
            "train.warmup_steps=%d covers the whole run of %d steps: the learning rate rises to %g at the last step "
            "(train.lr=%g) and the %s schedule never starts; shorten the warm-up (e.g. train.warmup_ratio=0.05)",
            t.warmup_steps,
            t.max_steps,
            lr_at(t.max_steps - 1, t),
            t.lr,
            t.lr_schedule,
        )
    return t


def join_group(p: ParallelConfig) -> tuple[int, int, torch.device]:
    """:func:`init_distributed` as the engine needs it: a group even alone (all but ``single``), and on a GPU one
    that reduces host tensors too where FSDP2 keeps its shards there (``cpu_offload``; DeepSpeed's offload reduces
    on the GPU)."""
    return init_distributed(
        p.timeout_s, need_group=p.backend != "single", cpu_collectives=p.cpu_offload and p.backend == "fsdp"
    )


@contextlib.contextmanager
def collective_job(cfg: RunConfig) -> Iterator[None]:
    """A job's process group around its work: the launch checked and the group joined first; left cleanly after
    success or after an error every rank raised at the same point (they can still meet at a barrier), and without
    the barriers otherwise, where another rank may never reach one."""
    check_launch(cfg)
    quiet_third_party()
    join_group(cfg.parallel)
    clean = False
    try:
        yield
        clean = True
    except BaseException as e:
        clean = is_agreed(e)
        raise
    finally:
        shutdown(clean=clean)


def train(cfg: RunConfig) -> list[dict[str, Any]]:
    """Run (or resume) a LoRA fine-tune as configured; returns the per-step metrics (on every rank)."""
    with collective_job(cfg):
        trainer = None
        try:
            trainer = Trainer(cfg)
            trainer.resume(cfg.checkpoint.resume)
            metrics = trainer.fit()
            trainer.backend.release()  # nothing trains on: a process that runs train() again gets its memory back
            return metrics
        finally:
            if trainer is not None:
                trainer.checkpointer.close()  # a background write finishes even if training failed
                trainer.checkpointer.release_lease()  # this process writes nothing more


def lora_as_saved(cfg: RunConfig) -> tuple[RunConfig, LoadedStep | None]:
    """Collective: ``cfg`` with LoRA applied as the adapter ``checkpoint.resume`` names (a step, DIR/best, a
    checkpoint dir's newest step, an adapter PEFT saved) says in its adapter_config.json (rank, alpha, targets,
    patterns, bias, ...), where the config's ``lora`` settings differ: an evaluation of a published adapter need
    not restate them. Read on rank 0, shared; the settings it changed are logged. Unchanged for ``auto``/``none``.
    Also returns the adapter as rank 0 read it (None on the other ranks), for :meth:`Trainer.resume` to load
    rather than read it again."""
    from dist_lora.lora import adapter_settings, peft_lora_config
    from dist_lora.storage import RetryPolicy

    resume, ck = cfg.checkpoint.resume, cfg.checkpoint
    if resume in (None, "auto", "none"):
        return cfg, None
    loaded: LoadedStep | None = None

    def differing() -> dict[str, Any]:
        nonlocal loaded
        loaded = read_adapter(str(resume), ck.storage_options, RetryPolicy.of(ck), "checkpoint.resume")
        found = adapter_settings(peft_lora_config(cfg.lora), loaded.adapter_config)
        if found:
            log.info(
                "evaluating %s with LoRA as its adapter_config.json says: %s",
                resume,
                ", ".join(f"{k} {getattr(cfg.lora, k.removeprefix('lora.'))!r} -> {v!r}" for k, v in found.items()),
            )
        return found

    settings = on_rank0(differing, share=True) or {}
    if not settings:
        return cfg, loaded
    data = config_to_dict(cfg, secrets=True)
    for setting, value in settings.items():
        key = setting.removeprefix("lora.")
        data["lora"][key] = getattr(LoraConfig(), key) if value is None else value  # (None: PEFT did not write it)
    try:
        return config_from_dict(data), loaded
    except ConfigError as e:
        raise ConfigError(
            f"{e}\n  (the settings {', '.join(settings)} are {resume}'s, as its adapter_config.json says: this "
            "config cannot evaluate that adapter as it is)"
        ) from e


def evaluate_checkpoint(cfg: RunConfig, *, every_step: bool = False) -> list[dict[str, Any]]:
    """Collective: the eval loss of saved steps over the config's eval data (``data.eval_path`` or
    ``data.eval_fraction``), at any world size and on any engine, one result per step; writes nothing (no lease, no
    save, no metrics file). The step is ``checkpoint.resume``'s: by default the newest verified one in
    ``checkpoint.dir``, a step's URL, ``DIR/best``, an adapter PEFT saved (a directory, a URL or a hub id: its
    result's ``step`` is None), or ``none`` for the base with a fresh adapter (which adds nothing: the base's own
    loss); ``every_step``: each committed step of the dir in turn, over one load of the base."""
    if not (cfg.data.eval_path or cfg.data.eval_fraction):
        raise ConfigError("dist-lora eval needs eval data: set data.eval_path (or data.eval_fraction)")
    if every_step and cfg.checkpoint.resume != "auto":
        raise ConfigError(
            f"dist-lora eval --every-step evaluates each committed step of checkpoint.dir, and checkpoint.resume="
            f"{cfg.checkpoint.resume} names one: drop --every-step to evaluate that one, or set checkpoint.dir to "
            "the dir whose steps to evaluate"
        )
    with collective_job(cfg):
        loaded = None
        if not every_step:
            cfg, loaded = lora_as_saved(cfg)
        trainer = Trainer(cfg, writes=False)
        steps: list[str | None] = [cfg.checkpoint.resume]
        if every_step:

            def committed() -> list[str]:
                return [
                    s.url for s in list_steps(trainer.checkpointer.storage, verify=False) if s.status == "committed"
                ]

            steps = list(on_rank0(committed, share=True) or [])
        results = []
        for step in steps or [None]:
            state = trainer.resume(step, loaded=loaded)
            loaded = None  # (its tensors are in the shards now)
            if trainer.resumed_from is None and step != "none":
                fix = (
                    "set checkpoint.dir to a run's checkpoint dir (--every-step evaluates each of its steps)"
                    if every_step
                    else "name one with checkpoint.resume=URL, or evaluate the base alone with checkpoint.resume=none"
                )
                raise ConfigError(f"dist-lora eval: {cfg.checkpoint.dir} has no committed step to evaluate; {fix}")
            loss = trainer.evaluate()  # (no stop request: dist-lora eval installs no signal handler)
            assert loss is not None
            done = trainer.eval_history[-1]
            sets = {
                name: {**done["sets"][name], "eval_rows": len(rows)}
                for name, rows in trainer.data.evals.items()
                if name is not None
            }
            results.append(
                {
                    "step": trainer.step if state is None or "step" in state else None,  # (None: PEFT's adapter)
                    "url": trainer.resumed_from,
                    "eval_loss": loss,
                    "eval_accuracy": done["eval_accuracy"],
                    "eval_rows": trainer.data.eval_rows,
                    **({"eval_sets": sets} if sets else {}),
                    "world_size": trainer.world,
                    "backend": trainer.backend.name,
                }
            )
        trainer.backend.release()
        return results


@contextlib.contextmanager
def collections_between_steps(every: int) -> Iterator[Callable[[int], None]]:
    """Python's cyclic garbage collector off while training, and run on its young generations after every
    ``every`` steps (torchtitan's ``gc_freq``): the function yielded takes the step just done. Left to itself, a
    full collection walks every object of the process (some 10^5-10^6 after importing torch, transformers and
    DeepSpeed) whenever allocations set it off, a pause that falls on another step on each rank; every collective
    then waits for the paused rank, so on many ranks some rank pauses nearly every step. Reference counting still
    frees tensors and autograd graphs as they go. ``every`` 0, or a collector already off: nothing changes."""
    if not every or not gc.isenabled():
        yield lambda step: None
        return

    def collect(step: int) -> None:
        if step % every == 0:
            gc.collect(1)

    gc.collect()  # what set-up left, once, before the first step
    gc.disable()
    try:
        yield collect
    finally:
        gc.enable()


class Trainer:
    """Build and wrap the model, then step, save and resume. The backend hides how the model is sharded."""

    def __init__(self, cfg: RunConfig, *, writes: bool = True):
        """``writes=False``: a trainer that only reads (``dist-lora eval``): no lease on the dir, no metrics."""
        check_launch(cfg)
        model = resolved_model(cfg.model)
        d = cfg.data
        data = replace(
            d,
            path=_local_abs_each(d.path),
            eval_path=_local_abs_sets(d.eval_path),
            chat_template=_local_abs(d.chat_template),
        )
        lora = replace(cfg.lora, init_from=_local_abs(cfg.lora.init_from))
        metrics_file = cfg.train.metrics_file and os.path.abspath(cfg.train.metrics_file)  # (`dist-lora plot CKPT_DIR`)
        train = replace(cfg.train, metrics_file=metrics_file)
        self.cfg = cfg = replace(cfg, model=model, data=data, lora=lora, train=train)
        t = cfg.train
        self.rank, self.world, self.device = join_group(cfg.parallel)
        self.grad_accum = grad_accum_steps(t, self.world)
        ck = cfg.checkpoint
        self.checkpointer = Checkpointer(ck, on_failure=self._save_failed)
        self.writes = writes
        if writes:
            self.checkpointer.take_lease()  # before any work: one writer per dir
        try:
            self._build(cfg)
        except BaseException:
            self.checkpointer.release_lease()  # a run that fails to start leaves the dir free
            raise

    def _build(self, cfg: RunConfig) -> None:
        """Tokenizer, data, base, LoRA, backend, metrics (after the lease is taken)."""
        t = cfg.train
        if backends.backend_class(cfg.parallel.backend).gathers_parameters(cfg.parallel):
            return_large_blocks_to_the_os()  # else glibc keeps every freed all-gather buffer: RSS would grow ~2x
        tokenizer = load_tokenizer(cfg.model.name_or_path, revision=cfg.model.revision)
        check_seq_len(cfg)
        self.data = prepare_data(cfg.data, tokenizer, seed=t.seed)  # tokenized once per node, then cached
        # the text of data.chat_template the samples were rendered with, saved with each step: its file may change,
        # or not be where the step is read; merge and generate use it (the base's own template is in the base)
        self.chat_template: str | None = tokenizer.chat_template if cfg.data.chat_template else None
        # the run's length and warm-up in steps (epochs: known now that the rows are)
        t = schedule(t, len(self.data), warns=self.rank == 0)
        self.cfg = cfg = replace(cfg, train=t)
        with collection_paused():  # a build makes ~10^5 objects: no full collections over the imported libraries
            plan = self._build_model(cfg)
        if self.writes:
            self.checkpointer.prepare(self.backend)  # the first save then stalls like the later ones
        self.metrics_log = MetricsLog(
            t.metrics_file, enabled=self.rank == 0 and self.writes, report_to=t.report_to, config=config_to_dict(cfg)
        )
        if plan is not None:  # ~4 bits per weight, or an error: a base left unquantized is a silent failure
            figures = check_and_log(self.backend.model, plan, DTYPES[cfg.model.dtype], warns=self.rank == 0)
            self.metrics_log.event("quantization", **figures)
        self.step = 0
        self.stop = StopRequest()
        self.stopped_early = False
        self.early_stopped = False  # train.early_stopping_patience ended the run
        self.grad_norm = math.nan
        self._checked_finite = False
        self.stop_at = self.cfg.train.stop_at_step or self.cfg.train.max_steps
        self.eval_history: list[dict[str, Any]] = []  # {"step", "eval_loss", "eval_accuracy"}, carried by resume
        self.last_saved: int | None = None
        self.clock = JobClock(cfg.checkpoint.every_minutes, cfg.train.stop_after_minutes)  # rank 0's decides
        self.save_due = False  # checkpoint.every_minutes: the step just taken is to be saved (agreed)
        self.resumed_from: str | None = None
        self.init_from: dict[str, Any] | None = None  # the adapter lora.init_from started the run from (url, step)
        self.metrics: list[dict[str, Any]] = []
        self.log_lines = False  # fit: a line every train.log_every_steps in place of the bar (a log file)
        self._fit_began = (0, 0.0)  # fit: the step it began at, and when (the time left)
        self._held_row: dict[str, Any] | None = None

    def _build_model(self, cfg: RunConfig) -> Plan | None:
        """The base, LoRA over it, the quantization (QLoRA's plan, or None) and the wrapped engine."""
        t = cfg.train
        # FSDP2 and ZeRO-3 never hold more than a shard of the base on any rank; the others load a replica
        engine = backends.backend_class(cfg.parallel.backend)
        # a hub id: its snapshot (at model.revision), downloaded where missing; its directory is named by its commit,
        # which every step records: a resume on a base the hub has changed since says so
        directory = base_directory(cfg.model.name_or_path, revision=cfg.model.revision)
        hub = directory not in (None, cfg.model.name_or_path)
        self.base_revision = os.path.basename(str(directory)) if hub else cfg.model.revision
        if (
            directory is None
            and self.rank == 0
            and (engine.gathers_parameters(cfg.parallel) or cfg.model.quantization != "none")
        ):
            log.warning(
                "%s has no safetensors weights on the hub (pickle files only), so every rank loads it whole with "
                "from_pretrained before it is sharded or quantized; to load each rank's shard alone, save it once with "
                "model.save_pretrained(DIR, safe_serialization=True) and set model.name_or_path: DIR",
                cfg.model.name_or_path,
            )
        base: Any
        base, weights = engine.load_base(
            cfg.parallel,
            directory or cfg.model.name_or_path,
            DTYPES[cfg.model.dtype],
            self.device,
            quantized=cfg.model.quantization != "none",
            revision=cfg.model.revision,  # where a hub id loads the full way
            micro_batch_size=t.micro_batch_size,
            grad_accum=self.grad_accum,
            max_grad_norm=t.max_grad_norm,
        )
        if hub:  # named by its hub id, as from_pretrained of the id names it (PEFT saves this name, not the cache's)
            base.name_or_path = base.config.name_or_path = cfg.model.name_or_path
        prepare_base(base, cfg.model.attn_implementation, t.loss_chunk_tokens, t.recompute_every())
        check_vocab(base, self.data)
        if cfg.data.packing:
            check_packing(base, self.data)
        if cfg.lora.target_parameters and not t.activation_checkpointing and self.rank == 0:
            log.warning(
                "lora.target_parameters without train.activation_checkpointing: PEFT adds the adapter to every "
                "expert of a layer in its forward and autograd keeps that sum, unsharded, for the backward of every "
                "layer (about the whole model's experts per rank); set train.activation_checkpointing: true to keep "
                "one layer's at a time"
            )
        model = apply_lora_seeded(base, cfg.lora, cfg.model.name_or_path, self.base_revision, t.seed)
        dtype = DTYPES[cfg.model.dtype]
        if (
            dtype != torch.float32
            and self.rank == 0
            and any(p.dtype == dtype for p in model.parameters() if p.requires_grad)
        ):
            log.warning(  # (lora.one_trainable_dtype: the adapters took the base's dtype)
                "model.dtype is %s and some of the base's own tensors train (lora.bias, lora.modules_to_save or "
                "lora.trainable_token_indices), so LoRA's adapters train in %s as well (FSDP2 and DeepSpeed need one "
                "dtype for what trains); for float32 weights, load the base in float32 and compute in bf16 "
                "(model.dtype: float32, parallel.mixed_precision: bf16)",
                cfg.model.dtype,
                cfg.model.dtype,
            )
        if t.neftune_noise_alpha:  # HF's hook on the input embeddings; its draws are the micro-batch's (_micro_step)
            from transformers.integrations.neftune import activate_neftune

            activate_neftune(model, t.neftune_noise_alpha)
        plan = None
        if cfg.model.quantization == "nf4":  # QLoRA: before sharding, so that FSDP2 shards the 4-bit bytes
            shards = backends.backend_class(cfg.parallel.backend).shards(cfg.parallel)
            plan = quantize_base(model, shards, self.device)

        self.backend = backends.build(
            cfg.parallel,
            model,
            lambda params: adamw(model, params, t),
            bias=cfg.lora.bias,
            micro_batch_size=t.micro_batch_size,
            grad_accum=self.grad_accum,
            weights=weights,
            max_grad_norm=t.max_grad_norm,
        )
        if t.compile:  # after wrapping: the forward compiled is the block's final class's (FSDP2 subclasses it)
            blocks = compile_blocks(self.backend.model)
            if self.rank == 0:
                log.info(
                    "train.compile: %d transformer blocks compile at the first step (and at the first evaluation), "
                    "which takes longer than the others",
                    blocks,
                )
        return plan

    def resume(self, resume: str | None, *, loaded: LoadedStep | None = None) -> dict[str, Any] | None:
        """Collective: load the adapter and optimizer state into the shards as ``checkpoint.resume`` says ("auto":
        the newest verified step of checkpoint.dir, if any; "none"; or a step's URL); returns the step's trainer
        state, or None. A trainer that only reads (``dist-lora eval``) loads the adapter's weights alone, and may be
        given an adapter PEFT saved (a directory, a URL or a hub id), whose state has no step; ``loaded``: that
        adapter as rank 0 already read it (:func:`lora_as_saved`)."""
        ck, t = self.cfg.checkpoint, self.cfg.train
        state = resume_checkpoint(
            self.backend.model,
            resume,
            ck.dir,
            optimizer=self.backend.optimizer if self.writes else None,  # (an evaluation steps nothing)
            storage_options=ck.storage_options,
            bucket_mb=ck.bucket_mb,
            backend=self.backend,
            retry=self.checkpointer.retry,
            writes=self.writes,
            loaded=loaded,
        )
        if state is None:
            if self.writes:  # a fresh run
                self.metrics_log.started(dir=ck.dir, world_size=self.world, backend=self.backend.name)
                if self.cfg.lora.init_from:
                    self.start_from(self.cfg.lora.init_from)
            return None
        url = self.resumed_from = state["checkpoint_url"]
        if "step" not in state:  # (an evaluation of an adapter PEFT saved: no run, no settings to compare)
            if self.rank == 0:
                log.info("evaluating %s: an adapter PEFT saved, read unverified (no manifest, so no sha256)", url)
            return state
        self.init_from = state.get("init_from")
        if self.cfg.lora.init_from and self.rank == 0:
            log.info("lora.init_from is not read: the run goes on from its own step (it only starts a fresh run)")
        self.step = self.last_saved = int(state["step"])
        self.eval_history = list(state.get("eval_history", []))
        if self.metrics_log.wandb_id is not None and state.get("wandb_run_id"):
            self.metrics_log.wandb_id = state["wandb_run_id"]  # the same W&B run goes on
        self.metrics_log.resumed(
            self.step,
            url=url,
            world_size=self.world,
            backend=self.backend.name,
            saved_world_size=state.get("world_size"),
            saved_backend=state.get("backend"),
        )
        changed = config_changes(state.get("config"), config_to_dict(self.cfg))
        saved_batch, saved_seed = state.get("global_batch_size"), state.get("seed")
        reordered = saved_batch not in (None, t.global_batch_size) or saved_seed not in (None, t.seed)
        if not self.writes:  # dist-lora eval: what changes the eval rows, not how the run trained
            split = bool(self.cfg.data.eval_fraction)  # (drawn with train.seed)
            changed = [c for c in changed if c.startswith("data.") or (split and c.startswith("train.seed "))]
        elif reordered:
            changed.append("the global batch or the seed, so the sample order changes")
        saved_template = state.get("chat_template")  # (a change of data.chat_template itself is in the config's)
        if saved_template and self.chat_template and saved_template != self.chat_template:
            changed.append("data.chat_template's text (the template the samples are rendered with)")
        if state.get("base_revision") not in (None, self.base_revision) and self.base_revision is not None:
            changed.append(
                f"the base {self.cfg.model.name_or_path} is the hub's commit {self.base_revision} now, "
                f"{state['base_revision']} then (to use the saved one: model.revision={state['base_revision']})"
            )
        if changed and self.rank == 0:  # the run goes on as configured now: say what differs from the saved run
            doing = "resuming" if self.writes else "evaluating"
            log.warning(
                "%s %s with settings that differ from the run that saved it: %s", doing, url, "; ".join(changed)
            )
        log.info(
            "resumed from %s at step %d (saved by %s at world size %s; now %s at world size %d)",
            url,
            self.step,
            state.get("backend"),
            state.get("world_size"),
            self.backend.describe(),
            self.world,
        )
        return state

    def start_from(self, path: str) -> None:
        """Collective: the adapter's weights from ``path`` (``lora.init_from``), into the shards; the optimizer's
        state, the schedule and the step count stay a fresh run's."""
        ck = self.cfg.checkpoint
        self.init_from = loaded = load_adapter(
            self.backend.model,
            path,
            storage_options=ck.storage_options,
            bucket_mb=ck.bucket_mb,
            backend=self.backend,
            retry=self.checkpointer.retry,
            what="lora.init_from",
        )
        if self.rank == 0:
            log.info(
                "the adapter starts from %s (%s); the optimizer, the schedule and the step count start afresh",
                loaded["url"],
                f"step {loaded['step']} of the run that saved it"
                if loaded["verified"]
                else "an adapter PEFT saved: no manifest, so no sha256 to verify it by, nor a fingerprint of its base",
            )

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns the loss averaged over it (the gradients' global
        norm, before clipping, is ``self.grad_norm``)."""
        t = self.cfg.train
        lr = lr_at(self.step, t)
        # the loss is the mean over the global batch's target tokens, however they fall on ranks and micro-batches:
        # each micro-batch sums its token losses and divides by this, and backward and the gradient reduction
        # divide by grad_accum and the world size
        per_micro = self.data.step_targets(seed=t.seed, step=self.step, global_batch=t.global_batch_size) / (
            self.world * self.grad_accum
        )
        first = not self._checked_finite  # the first step of this process: NaN/inf stops the run, layer named
        watch = FirstNonFinite(self.backend.model)
        losses = []
        with watch if first else contextlib.nullcontext():
            for m in range(self.grad_accum):
                losses.append(self._micro_step(m, per_micro))
        total = sum(losses)
        grads = self.backend.local_grads() if first else None
        if first:
            check_first_step(losses, grads, watch, self.step + 1, self.rank)
        self.grad_norm = self.backend.step(lr, t.max_grad_norm)
        if first and grads is None:  # an engine that keeps its gradients: their global norm tells
            check_first_step([self.grad_norm], None, watch, self.step + 1, self.rank, "gradient norm")
        self._checked_finite = True
        self.step += 1
        mean_loss, stop, self.save_due = step_consensus(
            total / self.grad_accum, self.stop.requested or self._out_of_time(), self.clock.save_due(self.rank)
        )
        if not (math.isfinite(mean_loss) and math.isfinite(self.grad_norm)):  # agreed: the same on every rank
            self.metrics_log.event("non_finite", step=self.step, loss=mean_loss, grad_norm=self.grad_norm)
            check_step(self.step, mean_loss, self.grad_norm, self._non_finite_rows(losses), self.rank, self.last_saved)
        self.stopped_early = self.stopped_early or stop
        return mean_loss

    def _out_of_time(self) -> bool:
        """Rank 0: whether ``train.stop_after_minutes`` have passed since ``fit`` began, by its clock (told to
        every rank as a stop request is, in the step's all-reduce)."""
        if not self.clock.out_of_time(self.rank):
            return False
        minutes = self.cfg.train.stop_after_minutes
        log.warning(
            "step %d: train.stop_after_minutes=%g reached: stopping after it, with a checkpoint", self.step, minutes
        )
        return True

    def _non_finite_rows(self, losses: list[float]) -> list[int]:
        """The training rows of this rank's micro-batches of the step just taken whose loss is not finite."""
        return [
            row
            for m, loss in enumerate(losses)
            if not math.isfinite(loss)
            for row in self._micro_rows(self.step - 1, m)
        ]

    def _micro_rows(self, step: int, m: int) -> list[int]:
        """The rows of this rank's micro-batch ``m`` of ``step`` (0-based: the step about to be taken is self.step)."""
        t = self.cfg.train
        return self.data.micro_batch_ids(
            seed=t.seed,
            step=step,
            global_batch=t.global_batch_size,
            micro=t.micro_batch_size,
            world=self.world,
            rank=self.rank,
            index=m,
        )

    def _micro_step(self, m: int, per_micro: float) -> float:
        """Forward and backward of micro-batch ``m`` of this rank's share of the step; returns its loss."""
        t = self.cfg.train
        batch = self.data.train.batch(self._micro_rows(self.step, m))
        last = m == self.grad_accum - 1
        # the forward's random draws (LoRA dropout) from this micro-batch's place alone, like its rows: the same
        # masks at any world size (for the same micro_batch_size) and after a resume, as if never stopped
        torch.manual_seed(draw_seed(t.seed, self.step, micro_place(m, self.world, self.rank)))
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        loss = self.backend.forward({**inputs, "num_items_in_batch": per_micro}, last_micro=last)
        self.backend.backward(loss, grad_accum=self.grad_accum, last_micro=last)
        return float(loss.detach())

    def evaluate(self) -> float | None:
        """Collective: each eval set's mean token loss over all its rows, each rank running its share of them (the
        same number of forwards on every rank, as a sharded forward is a collective), and its token accuracy (the
        share of target tokens the model ranks first); one all-reduce for every set. Equal at any world size.
        Returns the loss of the set early stopping and keep_best follow (:func:`best_eval_set`); ``eval_history``
        gets it and its accuracy, and, with named sets, every set's (``sets``).

        A stop request (SIGTERM, SIGUSR1) that arrives on any rank while it runs ends it after the batch in hand on
        every rank (agreed after each batch: one tiny all-reduce), since a long evaluation would otherwise spend the
        grace period a preempted job has to save: nothing is recorded, and it returns None."""
        t = self.cfg.train
        assert self.data.evals
        micro = t.eval_batch_size or t.micro_batch_size
        model = self.backend.model
        model.eval()
        sums: list[float] = []
        batches = 0
        try:
            with torch.no_grad():
                for name in self.data.evals:
                    total, correct = 0.0, 0.0
                    for batch in self.data.eval_batches(name, micro, self.world, self.rank):
                        inputs = {k: v.to(self.device) for k, v in batch.items()}
                        out = self.backend.outputs({**inputs, "num_items_in_batch": 1.0})
                        total += float(out.loss)  # a sum of token losses
                        correct += correct_predictions(out.logits, inputs["labels"])
                        del out  # the logits, before the next forward makes its own
                        batches += 1
                        if sum_over_ranks([float(self.stop.requested)])[0]:
                            if self.rank == 0:  # (every rank stops here)
                                log.warning(
                                    "step %d: evaluation stopped after %d batch(es) on a stop request, not "
                                    "recorded; saving the step (dist-lora eval evaluates it later)",
                                    self.step,
                                    batches,
                                )
                            return None
                    sums += [total, correct]
        finally:
            model.train()
        sums = sum_over_ranks(sums)
        results: dict[str | None, dict[str, float]] = {}
        for (name, rows), total, correct in zip(self.data.evals.items(), sums[::2], sums[1::2], strict=True):
            targets = int(rows.n_targets.sum())
            loss, accuracy = total / targets, correct / targets
            results[name] = {"eval_loss": loss, "eval_accuracy": accuracy}
            self.metrics_log.eval(self.step, loss, accuracy, name=name)
            log.info(
                "step %d: eval loss %.6f, token accuracy %.4f over %d rows%s",
                self.step,
                loss,
                accuracy,
                len(rows),
                "" if name is None else f" of eval set {name}",
            )
        followed = results[best_eval_set(self.cfg)]
        named = {name: r for name, r in results.items() if name is not None}
        self.eval_history.append({"step": self.step, **followed, **({"sets": named} if named else {})})
        return followed["eval_loss"]

    def plateau(self) -> tuple[int, dict[str, Any]] | None:
        """The evaluations in a row, the latest included, that have not improved on the best before them (by
        ``train.best_metric``) by more than ``train.early_stopping_threshold``, and that best (HF's
        EarlyStoppingCallback counts the same way); None without evaluations. Every rank computes it from the same
        agreed values."""
        if not self.eval_history:
            return None
        t = self.cfg.train
        best, count = self.eval_history[0], 0
        for e in self.eval_history[1:]:
            if improves(e, best, t.best_metric, t.early_stopping_threshold):
                best, count = e, 0
            else:
                count += 1
        return count, best

    def should_stop_early(self) -> bool:
        """Whether ``train.early_stopping_patience`` evaluations in a row have not improved (logged when so)."""
        t = self.cfg.train
        patience, plateau = t.early_stopping_patience, self.plateau()
        if patience is None or plateau is None or plateau[0] < patience:
            return False
        count, best = plateau
        if self.rank != 0:  # (every rank stops: rank 0 says why)
            return True
        followed = best_eval_set(self.cfg)
        log.warning(
            "early stopping at step %d: the eval %s%s has not improved on %.6f (step %d) for %d evaluations "
            "(train.early_stopping_patience=%d)",
            self.step,
            t.best_metric,
            "" if followed is None else f" of eval set {followed}",
            best.get(f"eval_{t.best_metric}", math.nan),
            best["step"],
            count,
            patience,
        )
        return True

    def best_eval(self) -> dict[str, Any] | None:
        """The best evaluation so far by ``train.best_metric`` (the earliest of a tie), of the set
        :func:`best_eval_set` names where there are several (its step is kept out of retention with keep_best)."""
        best = self.best_evals(1)
        return best[0] if best else None

    def best_evals(self, n: int) -> list[dict[str, Any]]:
        """The ``n`` best evaluations so far by ``train.best_metric``, best first (the earlier of a tie first)."""
        return best_first(self.eval_history, self.cfg.train.best_metric)[:n]

    def save(self) -> str | None:
        """Save the current step (collective); returns its URL (None if it failed under on_error=warn)."""
        t = self.cfg.train
        trainer_state = {
            "samples_seen": self.step * t.global_batch_size,
            "global_batch_size": t.global_batch_size,
            "seed": t.seed,
            "lr_schedule": {
                "name": f"warmup_{t.lr_schedule}",
                "lr": t.lr,
                "min_lr_ratio": t.min_lr_ratio,
                "warmup_steps": t.warmup_steps,
                "max_steps": t.max_steps,
                **({"decay_ratio": t.decay_ratio} if t.lr_schedule == "wsd" else {}),
                "last_lr": lr_at(max(self.step - 1, 0), t),
            },
            "config": config_to_dict(self.cfg),
            "chat_template": self.chat_template,
            "base_revision": self.base_revision,
            "eval_history": self.eval_history,
            "best_eval": self.best_eval(),
            "wandb_run_id": self.metrics_log.wandb_id,  # rank 0's, which it saves: the run a resume goes on in
            "init_from": self.init_from,  # the adapter the run started from (lora.init_from), or None
        }
        keep = {e["step"] for e in self.best_evals(int(self.cfg.checkpoint.keep_best))}  # (true: 1, false: 0)
        self.clock.saved()
        url = self.checkpointer.save(self.backend, step=self.step, trainer_state=trainer_state, keep=keep)
        self.last_saved = self.step
        return url

    def close(self) -> None:
        """Collective: wait for a background save to commit (a failure: raised on every rank, or reported)."""
        self.checkpointer.wait()

    @property
    def save_failures(self) -> int:
        """Saves that failed under ``checkpoint.on_error: warn``."""
        return self.checkpointer.failures

    def _save_failed(self, e: BaseException) -> None:
        step = self.checkpointer.failed_steps[-1]  # an asynchronous save's failure is known a step or more later
        self.metrics_log.event("save_failed", step=step, error=f"{type(e).__name__}: {e}")

    def fit(self) -> list[dict[str, Any]]:
        """Train to ``stop_at_step`` (or ``max_steps``), saving every ``every_steps`` and at the end.

        SIGTERM or SIGUSR1 on any rank ends the run after the current step, with a checkpoint (see preempt.py).
        """
        from tqdm import tqdm

        t = self.cfg.train
        stop = self.stop_at = t.stop_at_step or t.max_steps
        ended = self.should_stop_early()  # a resumed run that early stopping ended: nothing to do, as at max_steps
        if ended or self.step >= stop:
            if ended:
                log.info(
                    "nothing to do: early stopping ended this run at step %d; raise train.early_stopping_patience "
                    "(or set it to null) to train on",
                    self.step,
                )
            else:
                log.info(
                    "nothing to do: the run is already at step %d (stop at %d); its newest step is %s. Raise "
                    "train.max_steps (or train.stop_at_step) to train on, or use another checkpoint.dir",
                    self.step,
                    stop,
                    self.resumed_from,
                )
            self.checkpointer.release_lease()
            self.metrics_log.close()
            return self.metrics
        log.info(
            "training %s on %d rank(s), backend %s, grad_accum %d, steps %d..%d",
            self.cfg.model.name_or_path,
            self.world,
            self.backend.describe(),
            self.grad_accum,
            self.step + 1,
            stop,
        )
        # a terminal shows a bar; a log file (SLURM's, a pod's) gets a line every train.log_every_steps instead
        self.log_lines = self.rank == 0 and not sys.stderr.isatty()
        bar = tqdm(
            total=stop, initial=self.step, disable=self.rank != 0 or self.log_lines, desc="train", dynamic_ncols=True
        )
        self._fit_began = (self.step, time.perf_counter())
        self.clock.start()  # every_minutes, stop_after_minutes: the load not counted
        step_peak_memory(self.device)  # on a GPU, each step's peak from here: not the load's
        try:
            with self.stop, collections_between_steps(t.gc_every_steps) as collect:
                if t.eval_on_start and self.data.evals and self.step == 0 and not self.eval_history:
                    self.stopped_early = self.evaluate() is None  # the baseline, step 0 (a stop request: saved)
                while self.step < stop and not self.stopped_early and not self.early_stopped:
                    self._step_and_log(bar)
                    collect(self.step)
                if self.last_saved != self.step and self.step > 0:  # (stopped before step 1: nothing trained)
                    self.save()
                self.close()
        finally:  # a failed step too: the row of the step saved before it, and TensorBoard's events, are kept
            self._flush_held_row()
            bar.close()
            self.metrics_log.close()
        self.checkpointer.release_lease()
        if self.stopped_early:
            if self.rank == 0:
                log.warning("stopped after step %d on request; the checkpoint is committed (resume: auto)", self.step)
        else:
            log.info(
                "finished at step %d, loss %.4f", self.step, self.metrics[-1]["loss"] if self.metrics else math.nan
            )
        return self.metrics

    def _flush_held_row(self) -> None:
        """Log the row of the step that saved last, its ``save_stall_s`` now known in full: the time the save
        call blocked plus the time the next optimizer step waited for the background snapshot."""
        if self._held_row is not None:
            self._held_row["save_stall_s"] = round(self.checkpointer.history[-1].stall_s, 4)
            self.metrics_log.step(self._held_row)
            self._held_row = None

    def _step_and_log(self, bar: Any) -> None:
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.cfg.train)
        loss = self.train_step()
        seconds = time.perf_counter() - t0
        peak = step_peak_memory(self.device) if self.rank == 0 else None  # rank 0's: the one that logs
        t = self.cfg.train  # the step's own tokens, padding excluded (the step just taken is self.step - 1)
        tokens = self.data.step_tokens(seed=t.seed, step=self.step - 1, global_batch=t.global_batch_size)
        row = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": self.grad_norm,
            "epoch": round(self.step * self.cfg.train.global_batch_size / len(self.data), 4),
            "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1),
            "peak_memory_gib": None if peak is None else round(peak / 2**30, 3),
            "world_size": self.world,
            "backend": self.backend.name,
        }
        self._flush_held_row()  # the step just taken is the one that waited for the last save's snapshot, if any
        every_eval = self.cfg.train.eval_every_steps
        if self.data.evals and ((every_eval and self.step % every_eval == 0) or self.step == self.stop_at):
            if self.stopped_early:  # a stop was requested: save first (dist-lora eval evaluates the step later)
                if self.rank == 0:
                    log.warning("step %d: evaluation skipped on a stop request; saving the step", self.step)
            elif self.evaluate() is None:  # before a save of this step, which records it
                self.stopped_early = True  # a stop request arrived while it ran
            else:
                self.early_stopped = self.should_stop_early()
                if self.early_stopped:
                    self.metrics_log.event("early_stop", step=self.step)
        self.metrics.append(row)
        every = self.cfg.checkpoint.every_steps
        if self.save_due and not (every and self.step % every == 0):
            log.info(
                "step %d: checkpoint.every_minutes=%g have passed since the last save: saving it",
                self.step,
                self.cfg.checkpoint.every_minutes,
            )
        if (every and self.step % every == 0) or self.save_due:
            self.save()
            self._held_row = row  # logged after the next step, with the snapshot wait in its save_stall_s
        else:
            self.metrics_log.step(row)
        bar.update(1)
        shown = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "grad_norm": f"{self.grad_norm:.3f}"}
        if self.eval_history:  # the followed set's (HF's eval_NAME_loss for a named one), and the metric followed
            followed = best_eval_set(self.cfg)
            for metric in dict.fromkeys(("loss", self.cfg.train.best_metric)):
                key = f"eval_{metric}" if followed is None else f"eval_{followed}_{metric}"
                shown[key] = f"{self.eval_history[-1][f'eval_{metric}']:.4f}"
        bar.set_postfix(shown)
        every_line = self.cfg.train.log_every_steps
        if self.log_lines and every_line and (self.step % every_line == 0 or self.step == self.stop_at):
            log.info("%s", self._progress_line(row, shown))
        log.debug("step %d loss %.6f lr %.3e", self.step, loss, lr)

    def _progress_line(self, row: dict[str, Any], shown: dict[str, str]) -> str:
        """The progress bar's figures as one log line, for a log file: the step's own, and the time left at the
        mean pace of this process's steps so far (evaluations and saves included)."""
        first, began = self._fit_began
        pace = (time.perf_counter() - began) / max(self.step - first, 1)
        left = datetime.timedelta(seconds=round(pace * (self.stop_at - self.step)))
        figures = [f"step {self.step}/{self.stop_at}", *(f"{k} {v}" for k, v in shown.items())]
        figures += [f"{row['seconds']:.2f} s/step", f"{row['tokens_per_s']:,.0f} tokens/s"]
        if row["peak_memory_gib"] is not None:
            figures.append(f"peak {row['peak_memory_gib']:.2f} GiB")
        return " | ".join([*figures, f"{left} left"])
