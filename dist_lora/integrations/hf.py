"""HF Trainer callback: dist_lora checkpoints in place of the Trainer's own, under DeepSpeed ZeRO or FSDP2.

    from dist_lora.integrations.hf import DistLoraCallback

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[DistLoraCallback("s3://b/run")])
    trainer.train()  # no resume_from_checkpoint: the callback resumes from the newest verified step itself

A model you sharded yourself with FSDP2's ``fully_shard`` is given to the Trainer after :func:`mark_sharded`
(``dist_lora.load_sharded``'s models are marked already); the callback refuses an unmarked one, which the Trainer
would wrap in DDP.

Whenever the Trainer decides to save (``save_strategy``/``save_steps``), the callback saves a dist_lora step
instead (only the adapter and its Adam state are gathered, the step is committed atomically and verified on
load) and tells the Trainer to skip its own checkpoint. At ``on_train_begin`` it loads the newest verified step
(``resume="auto"``) into whatever the Trainer built at the current world size and engine: adapter, Adam state,
learning-rate schedule, global step, and the position in the data. The data position is exact when the global
batch (processes x per-device batch x accumulation) is the same as when the step was saved, as HF's own resume.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dist_lora.api import load_adapter, resume_checkpoint
from dist_lora.backends import attach
from dist_lora.backends.fsdp import mark_sharded, model_mesh
from dist_lora.checkpoint import CheckpointError, step_name, template_text
from dist_lora.checkpointer import Checkpointer
from dist_lora.config import CheckpointConfig, check_checkpoint
from dist_lora.distributed import sum_over_ranks
from dist_lora.lora import infer_bias_mode
from dist_lora.preempt import JobClock, StopRequest
from dist_lora.storage import RetryPolicy

log = logging.getLogger(__name__)

HF_STATE_KEY = "hf_trainer_state"

CLUSTER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""The signals ``stop_on_signals`` takes as a stop: a cluster's warnings, not Ctrl-C."""

__all__ = ["DistLoraCallback", "mark_sharded"]


def _unwrap_scheduler(scheduler: Any) -> Any:
    return getattr(scheduler, "scheduler", scheduler)  # accelerate's AcceleratedScheduler


class DistLoraCallback(TrainerCallback):
    """Save and resume HF Trainer runs as dist_lora steps (PEFT format, any world size, either engine).

    Args:
        dir: checkpoint directory: a local path or any fsspec URL (``s3://bucket/run``).
        resume: ``"auto"`` (the newest verified step in ``dir``, if any), ``"none"``, or the URL of one step.
        every_steps: save every N optimizer steps and at the last one, whatever the Trainer's ``save_strategy``
            (for ``save_strategy="no"``, which HF requires of models it cannot checkpoint itself). None: save when
            the Trainer would.
        every_minutes: also save the step that ends this many minutes after the last save (or the first step's
            start), by rank 0's clock, agreed by every rank in one tiny all-reduce per step.
        stop_after_minutes: stop training, with a checkpoint, after the step that ends this many minutes after the
            first step's start, by rank 0's clock (agreed as every_minutes is): a job in a time-limited slot.
        stop_on_signals: SIGTERM and SIGUSR1 (Kubernetes' and SLURM's warnings) on any rank while training end it
            after the step in hand, saved on every rank, as the trainer's do (agreed in one tiny all-reduce per
            step); False: their default action. Ctrl-C stays the Trainer's KeyboardInterrupt (a notebook's
            interrupt too: a train() that raises never reaches on_train_end, where the handlers are given back).
        keep_last: keep only the newest N committed steps (None: the Trainer's save_total_limit, if set; else all).
        async_save: write and upload in the background; training waits only for the gather.
        storage_options: fsspec options (``{"endpoint_url": ..., "key": ...}`` for S3).
        bucket_mb: size of one gather bucket.
        on_error: a failed save (after its retries): ``"raise"`` stops training, ``"warn"`` logs it and goes on.
        retry: how object-store calls are retried (:class:`dist_lora.storage.RetryPolicy`).
        run_id: this job's id in the dir's writer lease (default: DIST_LORA_RUN_ID, SLURM_JOB_ID,
            TORCHELASTIC_RUN_ID, else a fresh id); lease_ttl_s: when an unrenewed lease goes stale.
    """

    def __init__(
        self,
        dir: str,
        *,
        resume: str = "auto",
        every_steps: int | None = None,
        every_minutes: float | None = None,
        stop_after_minutes: float | None = None,
        stop_on_signals: bool = True,
        keep_last: int | None = None,
        async_save: bool = True,
        storage_options: dict[str, Any] | None = None,
        bucket_mb: float = 32.0,
        on_error: str = "raise",
        retry: RetryPolicy | None = None,
        run_id: str | None = None,
        lease_ttl_s: float = 600.0,
    ):
        if every_steps is not None and every_steps < 1:
            raise ValueError(f"every_steps must be at least 1 or None (got {every_steps})")
        if stop_after_minutes is not None and stop_after_minutes <= 0:
            raise ValueError(f"stop_after_minutes must be > 0 or None (got {stop_after_minutes})")
        retry = retry or RetryPolicy()
        self.config = CheckpointConfig(
            dir=dir,
            resume=resume,
            keep_last=keep_last,
            async_save=async_save,
            storage_options=dict(storage_options or {}),
            bucket_mb=bucket_mb,
            on_error=on_error,  # type: ignore[arg-type]  # checked by the Checkpointer
            retry_attempts=retry.attempts,
            every_minutes=every_minutes,
            retry_backoff_s=retry.backoff_s,
            retry_max_backoff_s=retry.max_backoff_s,
            io_timeout_s=retry.timeout_s,
            run_id=run_id,
            lease_ttl_s=lease_ttl_s,
        )
        self.every_steps = every_steps
        self.clock = JobClock(every_minutes, stop_after_minutes)  # rank 0's decides
        self.stop_on_signals = stop_on_signals
        self.stop: StopRequest | None = None  # this train()'s, installed while it trains
        self.checkpointer = Checkpointer(check_checkpoint(self.config, prefix=""))  # names each bad argument
        self.resumed_from: str | None = None
        self.last_saved: int | None = None
        self._skip: tuple[int, int] | None = None  # (epochs to skip, batches to skip in the next epoch)
        self._skipping_epoch = False
        self._epoch_shift = 0.0  # the share of the resumed epoch skipped, which the Trainer's epoch count misses
        self._state_checked = False  # whether a save can hold the optimizer's state (known after its first step)
        self._pending = False  # a step asked to be saved, once the Trainer has logged and evaluated it
        self._keep_best = False  # the Trainer's load_best_model_at_end: the best step is kept, and loaded at the end
        self._best_metric: str | None = None  # what the Trainer ranks evaluations by (metric_for_best_model)
        self._global_batch: int | None = None  # samples per step over all processes (known at on_train_begin)
        self._trainer: Any = None

    @classmethod
    def install(cls, trainer: Any, dir: str, **kwargs: Any) -> DistLoraCallback:
        """Create the callback, bind it to ``trainer`` and add it: the recommended way.

        Bound, a resume also resets the Trainer's own counters of this run (the steps its logged loss and
        speed are averaged over), which it sets before any callback runs.
        """
        _check_sharded(trainer.model)
        callback = cls(dir, **kwargs)
        callback._trainer = trainer
        trainer.add_callback(callback)
        return callback

    # ------------------------------------------------------------------------------------------ events

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        _check_sharded(kwargs["model"])

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.checkpointer.take_lease()  # one writer per dir, before any step
        try:
            self._begin(args, state, kwargs)
        except BaseException:
            self.checkpointer.release_lease()  # a run that fails to start leaves the dir free
            raise
        if self.stop_on_signals:  # (a fresh one for each train(): an earlier one's stop is not this one's)
            self.stop = StopRequest(CLUSTER_SIGNALS).__enter__()

    def _begin(self, args: TrainingArguments, state: TrainerState, kwargs: dict[str, Any]) -> None:
        """:meth:`on_train_begin` once the lease is held: the engine found, the newest step loaded."""
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        self._follow_save_arguments(args)
        self._global_batch = _global_batch(args)
        backend = attach(model, optimizer, infer_bias_mode(model))
        backend.ready()
        self.clock.start()  # (the clock's minutes from here: the load not counted)
        saved = resume_checkpoint(
            backend.model,
            self.config.resume,
            self.config.dir,
            optimizer=backend.optimizer,
            storage_options=self.config.storage_options,
            bucket_mb=self.config.bucket_mb,
            backend=backend,
            retry=self.checkpointer.retry,
        )
        if saved is None:
            return
        self._restore_trainer(args, state, saved, kwargs.get("lr_scheduler"), kwargs.get("train_dataloader"))
        self.resumed_from = saved["checkpoint_url"]
        self.last_saved = state.global_step
        if self._trainer is not None:  # its loss since the last log and its speed count this run's steps only
            self._trainer._globalstep_last_logged = state.global_step
            self._trainer._initial_global_step = state.global_step
        log.info(
            "resumed from %s at step %d (saved by %s at world size %s; now world size %d)",
            self.resumed_from,
            state.global_step,
            saved.get("backend"),
            saved.get("world_size"),
            args.world_size,
        )

    def _follow_save_arguments(self, args: TrainingArguments) -> None:
        """The Trainer's own save settings, where they bear on the callback's: ``save_strategy`` (when to save,
        unless ``every_steps`` is given) and ``save_total_limit`` (``keep_last``, unless given)."""
        if args.save_strategy == "best":
            raise ValueError(
                "DistLoraCallback cannot replace the checkpoints of save_strategy='best': the Trainer decides those "
                "after every callback has run, and would write its own checkpoint-* at each new best; use "
                "save_strategy='steps' (or every_steps=N with save_strategy='no'): each step keeps the log history, "
                "the evaluations of its step included"
            )
        said = args.process_index == 0
        if args.save_strategy == "no" and self.every_steps is None and self.clock.every_minutes is None and said:
            log.warning(
                "save_strategy='no' and neither every_steps nor every_minutes given: DistLoraCallback saves no step "
                "of this run (stop_after_minutes' aside); pass every_steps=N to save every N steps and the last"
            )
        self._keep_best = bool(args.load_best_model_at_end)
        self._best_metric = (args.metric_for_best_model or "").removeprefix("eval_") or None
        if self.checkpointer.keep_last is None and args.save_total_limit and args.save_total_limit > 0:
            self.checkpointer.keep_last = args.save_total_limit  # HF's retention, where keep_last is not given
            if said:
                log.info("keeping the newest %d steps (save_total_limit)", args.save_total_limit)

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._save_pending(state, kwargs)
        loader = kwargs.get("train_dataloader")
        if self._skip is None or loader is None:
            return
        epochs, batches = self._skip
        if epochs > 0:  # an epoch the resumed run had finished: pass over it without a batch
            self._skip = (epochs - 1, batches)
            self._skipping_epoch = True
            loader.skip_batches = _batches_per_epoch(loader, args, state)
        else:
            self._skip = None
            loader.skip_batches = batches
            self._epoch_shift = batches / max(_batches_per_epoch(loader, args, state), 1)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        loader = kwargs.get("train_dataloader")
        if loader is not None and hasattr(loader, "skip_batches"):
            loader.skip_batches = 0  # the next epoch starts at its first batch
        self._epoch_shift = 0.0
        if self._skipping_epoch:  # the Trainer stops after an epoch without a sample; this one was skipped on purpose
            self._skipping_epoch = False
            control.should_training_stop = state.global_step >= state.max_steps
        self._plan_save(args, state, control)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._save_pending(state, kwargs)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not self._state_checked:  # after the run's first step, not hours later at its first save
            self._state_checked = True
            model = kwargs["model"]
            attach(model, kwargs["optimizer"], infer_bias_mode(model)).check_optimizer_state()
        # The Trainer counts the resumed epoch's batches from those it was given, the skipped ones not among them;
        # the step's logs and its save read the epoch after this.
        state.epoch = (state.epoch or 0.0) + self._epoch_shift
        self._plan_save(args, state, control)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.stop is not None:
            self.stop.__exit__(None, None, None)  # (after a stop, a repeated SIGTERM while the process leaves is kept)
        self._save_pending(state, kwargs)
        self.checkpointer.wait()  # it commits (or fails) before train() returns
        if self._keep_best:
            self._load_best(args, state, kwargs)
        self.checkpointer.release_lease()

    def _load_best(self, args: TrainingArguments, state: TrainerState, kwargs: dict[str, Any]) -> None:
        """``load_best_model_at_end``: the best-evaluated step's adapter loaded into the model (collective), where
        the Trainer's own load found no checkpoint-* of it; the model keeps the last step's weights where that step
        cannot be loaded, said so."""
        best = state.best_global_step
        if not best or best == state.global_step:
            return
        url = self.checkpointer.storage.url_of(step_name(best))
        model = kwargs["model"]
        backend = attach(model, kwargs["optimizer"], infer_bias_mode(model))
        try:
            load_adapter(
                backend.model,
                url,
                storage_options=self.config.storage_options,
                bucket_mb=self.config.bucket_mb,
                backend=backend,
                retry=self.checkpointer.retry,
            )
        except CheckpointError as e:  # (agreed: every rank raises it alike)
            if args.process_index == 0:
                log.warning("load_best_model_at_end: the model keeps step %d's weights: %s", state.global_step, e)
            return
        state.best_model_checkpoint = url
        if args.process_index == 0:
            log.info("load_best_model_at_end: loaded %s (%s %s)", url, args.metric_for_best_model, state.best_metric)

    # ------------------------------------------------------------------------------------------ internals

    def _plan_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        """At a step's (or an epoch's) end: whether to save this step (the Trainer's own wish, ``every_steps`` or
        the clock), the Trainer's own checkpoint turned off. The save follows the step's log and evaluation."""
        asked = control.should_save
        control.should_save = False  # ours replaces the Trainer's own checkpoint
        if self.every_steps is not None:
            asked = state.global_step % self.every_steps == 0 or state.global_step >= state.max_steps
        due, out_of_time, signalled = self._agreed(args)
        said = args.process_index == 0  # (every rank acts on them; one says so)
        if due and not asked and said:
            log.info("step %d: every_minutes=%g have passed since the last save: saving it", state.global_step, due)
        if out_of_time:
            control.should_training_stop = True
            if said:
                log.warning(
                    "step %d: stop_after_minutes=%g reached: stopping, with a checkpoint",
                    state.global_step,
                    out_of_time,
                )
        if signalled:
            control.should_training_stop = True
            if said:
                log.warning("step %d: stopping on a stop signal, with a checkpoint", state.global_step)
        self._pending |= asked or bool(due) or bool(out_of_time) or signalled

    def _save_pending(self, state: TrainerState, kwargs: dict[str, Any]) -> None:
        """Save the step asked for at its end, now that the Trainer has logged and evaluated it (as HF's own
        checkpoint follows them), and before the next step changes the weights: at the next step's or epoch's
        start, or at the end of training."""
        if not self._pending:
            return
        self._pending = False
        if self.last_saved != state.global_step:
            self.save(
                state, kwargs["model"], kwargs["optimizer"], kwargs.get("lr_scheduler"), kwargs.get("processing_class")
            )

    def _agreed(self, args: TrainingArguments) -> tuple[float, float, bool]:
        """Rank 0's clock and every rank's stop signals, told to every rank in one tiny all-reduce (each rank calls
        this as often): every_minutes if that long has passed since the last save, stop_after_minutes if that long
        has since training began (0 for no), and whether a stop signal came to any rank."""
        every, limit = self.clock.every_minutes or 0.0, self.clock.stop_after_minutes or 0.0
        if not every and not limit and not self.stop_on_signals:
            return 0.0, 0.0, False
        rank = args.process_index
        signalled = self.stop is not None and self.stop.requested
        saves, stops, signals = sum_over_ranks(
            [float(self.clock.save_due(rank)), float(self.clock.out_of_time(rank)), float(signalled)]
        )
        return every if saves else 0.0, limit if stops else 0.0, signals > 0

    def save(
        self, state: TrainerState, model: Any, optimizer: Any, lr_scheduler: Any = None, processing_class: Any = None
    ) -> str | None:
        """Collective: save the current step now (the callback calls this when the Trainer would save).
        ``processing_class``: the Trainer's tokenizer, whose chat template the step keeps (``merge`` writes it)."""
        backend = attach(model, optimizer, infer_bias_mode(model))
        scheduler = _unwrap_scheduler(lr_scheduler)
        evals = _eval_history(state.log_history)
        trainer_state = {
            "chat_template": template_text(getattr(processing_class, "chat_template", None)),
            # the trainer's own keys, which `dist-lora ls` shows and DIR/best follows
            "eval_history": evals,
            "best_eval": next(
                ({**e, "metric": self._best_metric} for e in evals if e["step"] == state.best_global_step), None
            ),
            "epoch": state.epoch,
            "samples_seen": state.global_step * self._global_batch if self._global_batch else None,
            "global_batch_size": self._global_batch,
            "lr_scheduler": _jsonable(scheduler.state_dict()) if scheduler is not None else None,
            HF_STATE_KEY: {
                "epoch": state.epoch,
                # (without train()'s closing summary, which a save at the end of training follows: a resumed
                # run's history then reads as one run's, as after HF's own resume)
                "log_history": _jsonable([e for e in state.log_history if "train_runtime" not in e]),
                "total_flos": state.total_flos,
                "num_input_tokens_seen": state.num_input_tokens_seen,
                "best_metric": state.best_metric,
                "best_global_step": state.best_global_step,
            },
        }
        self.clock.saved()
        keep = {state.best_global_step} if self._keep_best and state.best_global_step else set()
        url = self.checkpointer.save(backend, step=state.global_step, trainer_state=trainer_state, keep=keep)
        self.last_saved = state.global_step
        return url

    @property
    def save_failures(self) -> int:
        """Saves that failed under ``on_error="warn"``."""
        return self.checkpointer.failures

    def _restore_trainer(
        self,
        args: TrainingArguments,
        state: TrainerState,
        saved: dict[str, Any],
        lr_scheduler: Any,
        loader: Any,
    ) -> None:
        step = int(saved["step"])
        hf = saved.get(HF_STATE_KEY) or {}
        state.global_step = step
        state.epoch = saved.get("epoch") or hf.get("epoch") or 0.0
        state.log_history = list(hf.get("log_history", []))
        state.total_flos = hf.get("total_flos", 0.0)
        state.num_input_tokens_seen = hf.get("num_input_tokens_seen", 0)
        state.best_metric, state.best_global_step = hf.get("best_metric"), hf.get("best_global_step")
        scheduler = _unwrap_scheduler(lr_scheduler)
        if scheduler is not None and saved.get("lr_scheduler"):
            _restore_scheduler(scheduler, saved["lr_scheduler"])
        if args.ignore_data_skip or loader is None or step == 0:
            return
        saved_batch, batch = saved.get("global_batch_size"), self._global_batch
        said = args.process_index == 0  # (every rank resumes alike; one says so)
        if saved_batch not in (None, batch) and said:
            log.warning(
                "%s was saved with a global batch of %s samples, and this run's is %s (processes x "
                "per_device_train_batch_size x gradient_accumulation_steps): the data skipped to resume is counted in "
                "steps, so the samples after the resume are not the ones the saved run would have trained on next "
                "(some repeat, some are skipped); keep the global batch to resume exactly",
                saved.get("checkpoint_url"),
                saved_batch,
                batch,
            )
        if not hasattr(loader, "skip_batches"):
            if said:
                log.warning(
                    "the train dataloader (%s) cannot skip batches: data restarts at its beginning", type(loader)
                )
            return
        per_epoch = max(math.ceil(_batches_per_epoch(loader, args, state) / args.gradient_accumulation_steps), 1)
        self._skip = (step // per_epoch, (step % per_epoch) * args.gradient_accumulation_steps)


def _check_sharded(model: Any) -> None:
    """Refuse, before ``train()``, a model of FSDP2 shards that the Trainer would wrap in DDP: one sharded by hand
    (``fully_shard``) without transformers' mark and with no FSDP plugin of accelerate's to take it."""
    from accelerate.state import AcceleratorState

    if getattr(model, "is_distributed_loading_by_transformers", False) or model_mesh(model) is None:
        return
    if getattr(AcceleratorState(), "fsdp_plugin", None) is not None:  # (accelerate's FSDP2 takes it)
        return
    raise ValueError(
        "the model's parameters are FSDP2 shards (DTensors) that HF's Trainer was not told of: it would wrap them "
        "in DDP, which fails at its first broadcast. Call dist_lora.integrations.hf.mark_sharded(model) after "
        "fully_shard and before Trainer(...) (dist_lora.load_sharded's models are marked already), or give the "
        "Trainer the unsharded model with TrainingArguments(fsdp='full_shard', fsdp_config={'fsdp_version': 2})"
    )


def _eval_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Trainer's evaluations of its ``eval_dataset`` (one, not a dict of them), as the trainer's own
    ``eval_history`` records them: the step, and each ``eval_*`` number the Trainer logged at it (its loss, and
    what ``compute_metrics`` gave)."""
    return [
        {"step": e["step"], **{k: v for k, v in e.items() if k.startswith("eval_") and _a_metric(k, v)}}
        for e in log_history
        if "eval_loss" in e and isinstance(e.get("step"), int)
    ]


def _a_metric(key: str, value: Any) -> bool:
    """A number an evaluation measured (not its speed: ``eval_runtime``, ``eval_samples_per_second``, ...)."""
    return isinstance(value, (int, float)) and not key.endswith(("_runtime", "_per_second"))


def _batches_per_epoch(loader: Any, args: TrainingArguments, state: TrainerState) -> int:
    """This process's batches in an epoch, as the Trainer counts them: the loader's length, or for a dataset without
    one (an ``IterableDataset``, a streamed ``datasets`` one) ``max_steps`` steps' worth, the Trainer's own epoch."""
    try:
        return len(loader)
    except TypeError:
        return state.max_steps * args.gradient_accumulation_steps


def _global_batch(args: TrainingArguments) -> int:
    """Samples per optimizer step over all processes."""
    return int(args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size)


def _restore_scheduler(scheduler: Any, saved: dict[str, Any]) -> None:
    """Put the schedule at the saved step. The engines group parameters differently (ZeRO drops empty groups), so
    per-group values come from this run's optimizer; for a LambdaLR (every HF schedule but plateau), the rate of
    each group is recomputed at the saved step."""
    per_group = ("base_lrs", "_last_lr", "lr_lambdas")
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.load_state_dict({**{k: v for k, v in saved.items() if k not in per_group}, "lr_lambdas": []})
        lrs = [
            base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]
    elif len(saved.get("base_lrs", [])) == len(scheduler.optimizer.param_groups):
        scheduler.load_state_dict(saved)
        lrs = scheduler.get_last_lr()
    else:
        raise CheckpointError(
            f"cannot restore a {type(scheduler).__name__} saved for {len(saved.get('base_lrs', []))} parameter "
            f"group(s) into an optimizer with {len(scheduler.optimizer.param_groups)}; use an HF LambdaLR schedule "
            "(lr_scheduler_type linear, cosine, constant_with_warmup, ...)"
        )
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr  # the next step runs at the saved schedule's rate, not the initial one
    scheduler._last_lr = list(lrs)


def _jsonable(value: Any) -> Any:
    """A scheduler state_dict as JSON (lambdas and other callables are not state; they come from the code)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return None
