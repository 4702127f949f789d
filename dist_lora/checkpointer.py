"""Saving during a run: with ``async_save`` a save costs training a hand-off, not a copy, a gather or a write.

A save has three parts. Snapshot (every rank): copy this rank's pieces of the adapter and its Adam state to CPU
memory (pinned, from a GPU), a copy training can no longer change. Gather (every rank): bring the pieces to rank 0
in bucketed collectives. Write (rank 0): serialize, hash, write and commit. Synchronously, all three block.

With ``async_save`` none of them does: :meth:`Checkpointer.save` hands the save to a background thread and
returns. That thread takes the snapshot first, while training runs the next forward and backward, which only read
the adapter. Only an optimizer step changes it, so every ``torch.optim`` optimizer step in the process passes a
pre-hook that waits until the snapshot is taken (the wait, usually zero, is counted as stall). Then the thread
gathers over a gloo process group of its own (never interleaving with training's collectives on the default
group), and rank 0 writes. The next save, and :meth:`Checkpointer.wait` at the end of training, first wait for it.
A background failure is logged at once and raised, on every rank, at the next save or at ``wait``. It never leaves
a committed but broken step: the manifest is the last thing written, so a failed write is an incomplete step,
which readers skip.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dist_lora.agree import Failure, agree, on_rank0
from dist_lora.backends import Backend, LocalPiece
from dist_lora.backends.base import Staging
from dist_lora.checkpoint import (
    AdapterState,
    CheckpointError,
    StepMeta,
    check_step,
    json_state,
    serialize_step,
    step_name,
    write_step,
)
from dist_lora.config import CheckpointConfig, check_checkpoint
from dist_lora.constants import ENV_LOCAL_RANK
from dist_lora.distributed import comm_device, group_timeout, on_launcher_gone
from dist_lora.faults import failpoint
from dist_lora.gather import gather_adapter
from dist_lora.lease import LEASE_IDENTITY, Lease, default_run_id
from dist_lora.lora import adapter_aliases, adapter_config_dict, base_fingerprint
from dist_lora.storage import RetryPolicy, Storage

log = logging.getLogger(__name__)


# Every background group stays alive until the process group is destroyed at shutdown. A gloo group freed with
# its Checkpointer (a user's loop that makes one per save) can close its connections while a peer rank is still
# finishing the last collective on it, which that rank sees as "Connection closed by peer".
_GROUPS: list[Any] = []


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


@dataclass
class SaveOutcome:
    """A save's outcome, agreed by every rank: committed (``failure`` None), or the first failing rank's error."""

    step: int
    failure: Failure | None = None
    local_error: BaseException | None = None
    """This rank's own error, if it is the one that failed (raised as it is, with its traceback)."""

    @property
    def committed(self) -> bool:
        return self.failure is None


@dataclass
class SaveStats:
    step: int
    save_s: float = 0.0
    """Seconds :meth:`Checkpointer.save` blocked (asynchronous: a hand-off; synchronous: gather + write)."""
    snapshot_wait_s: float = 0.0
    """Seconds an optimizer step waited for the background snapshot of this save (asynchronous only)."""
    snapshot_s: float | None = None
    """Seconds the background snapshot took (asynchronous only): the stall if an optimizer step came at once."""
    write_s: float | None = None
    """Seconds spent serializing, writing and committing (rank 0), once known."""
    bytes: int | None = None
    done_s: float | None = None
    """Seconds from the save call until this rank's part was done (committed, on rank 0), once known."""

    @property
    def stall_s(self) -> float:
        """Seconds training was blocked by this save."""
        return self.save_s + self.snapshot_wait_s


class Checkpointer:
    """Saves one run's steps to ``dir``; every method but :meth:`close` is a collective."""

    def __init__(self, config: CheckpointConfig, *, on_failure: Callable[[BaseException], None] | None = None):
        """``config``: where and how steps are saved (dir, keep_last, storage_options, bucket_mb, async_save,
        on_error, retry_*, io_timeout_s); its ``every_steps``, ``resume``, ``run_id`` and ``lease_ttl_s`` are
        for the caller. ``on_error`` says what a failed save (after its retries) does: "raise": :meth:`save` or
        :meth:`wait` raises it on every rank; "warn": it is logged, counted in ``failures`` and passed to
        ``on_failure``; training goes on and the next save still runs."""
        c = self.config = check_checkpoint(config)
        self.dir = c.dir
        self.keep_last = c.keep_last
        self.storage_options = c.storage_options
        self.bucket_bytes = int(c.bucket_mb * 2**20)
        self.async_save = c.async_save
        self.retry = RetryPolicy.of(c)
        self.on_error = c.on_error
        self.on_failure = on_failure
        self.failures = 0
        self.failed_steps: list[int] = []  # the steps whose save failed under "warn", in order
        self.history: list[SaveStats] = []
        self._storage: Storage | None = None
        self._executor: ThreadPoolExecutor | None = None  # one long-lived worker: no thread start per save
        self._pending: Future[SaveOutcome] | None = None
        self._staging = Staging()
        self._snapshotted: threading.Event | None = None  # set once the pending save's snapshot is taken
        self._guard: Any = None  # the optimizer step pre-hook that waits for it
        self._outcome: SaveOutcome | None = None
        self.lease: Lease | None = None
        self._static: tuple[int, tuple[dict[str, Any], dict[str, Any], dict[str, str]]] | None = None
        self._group: Any = None
        if self.async_save:  # now, with every rank here: the first save then stalls like the others
            self._background_group()
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist-lora-save")
            self._executor.submit(lambda: None).result()  # its thread starts now, not at the first save

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = Storage(self.dir, self.storage_options, self.retry)
        return self._storage

    def take_lease(self) -> None:
        """Collective: take the dir's writer lease on rank 0 (for ``config.run_id``, default: the scheduler's job
        id; stale after ``config.lease_ttl_s``) and renew it in the background (see lease.py).

        Raises LeaseError on every rank when another live run holds the dir.
        """

        def take() -> None:
            failpoint("lease.acquire")
            lease = Lease(self.storage, self.config.run_id or default_run_id(), self.config.lease_ttl_s)
            lease.acquire()
            lease.start_heartbeat()
            self.lease = lease
            on_launcher_gone(self.release_lease)  # an orphaned rank 0 leaves the dir free for the next job

        on_rank0(take)
        self._check_dir_reaches_every_node()

    def _check_dir_reaches_every_node(self) -> None:
        """Collective, for a local dir on several ranks: one rank per node (local rank 0) reads the lease rank 0 has
        just written; rank 0 warns naming the ranks whose node does not find it there. Such a dir is one node's own
        disk: a restart whose rank 0 lands on another node (an elastic re-form, a requeued job) would find no step
        there and start over."""
        dist = torch.distributed
        if not self.storage.is_local or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        rank, world = dist.get_rank(), dist.get_world_size()

        def identity() -> dict[str, Any] | None:
            record = self.lease.read() if self.lease is not None else None
            return {k: record.get(k) for k in LEASE_IDENTITY} if record else None

        held = on_rank0(identity, share=True)
        blind = 0
        if rank != 0 and os.environ.get(ENV_LOCAL_RANK) == "0" and held is not None:
            try:
                failpoint("lease.visible")
                seen = Lease(self.storage, "").read() or {}
            except (OSError, CheckpointError):
                seen = {}
            blind = int(any(seen.get(k) != v for k, v in held.items()))
        flags = torch.zeros(world, dtype=torch.int64, device=comm_device())
        flags[rank] = blind
        dist.all_reduce(flags)
        if rank == 0 and flags.any():
            ranks = ", ".join(str(r) for r in flags.nonzero().flatten().tolist())
            log.warning(
                "checkpoint.dir %s is not the same directory on every node: the node(s) of rank(s) %s do not find "
                "the lease rank 0 wrote there. A restart whose rank 0 is on another node would find no step there "
                "and start over; put it on a filesystem every node mounts, or on S3 (s3://bucket/prefix)",
                self.dir,
                ranks,
            )

    def release_lease(self) -> None:
        """Not a collective: rank 0 gives the lease up (after the last save committed)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def save(
        self,
        backend: Backend,
        *,
        step: int,
        trainer_state: dict[str, Any] | None = None,
        keep: set[int] | frozenset[int] = frozenset(),
    ) -> str | None:
        """Collective: snapshot the adapter at ``step`` and commit it (now, or in the background). Returns its URL
        (None when it failed under ``on_error="warn"``). Retention (``keep_last``) never deletes the steps in
        ``keep`` (the trainer's best-evaluated steps under ``keep_best``).

        Asynchronous: returns at once. A background thread copies this rank's shard of the adapter and its Adam
        state (the snapshot), then gathers and writes. Until the snapshot is taken, any ``torch.optim`` optimizer
        step in this process first waits for it (a pre-hook; the time is ``SaveStats.snapshot_wait_s``), so the
        step saved is exactly the state at this call. Change adapter weights outside an optimizer step only after
        :meth:`wait_snapshot`.

        Every failure of a save, on any rank and of any kind (an OSError, a storage or format error), is agreed by
        all ranks and handled by ``on_error`` alike on each. An earlier background save that failed is handled
        here first (``on_error="warn"``: reported, and this save still runs).
        """
        step = check_step(step)
        try:  # the values of this call (the caller may change them while an asynchronous save runs)
            state: dict[str, Any] | CheckpointError = json_state(trainer_state)
        except CheckpointError as e:
            state = e  # raised by rank 0 inside the save, so that every rank handles it alike
        t0 = time.perf_counter()
        earlier = self._settle()  # the previous background save is done
        if earlier is not None:
            self._apply_policy(earlier)  # raise: raised here, on every rank; warn: reported, and this save goes on
        stats = SaveStats(step=step)
        self.history.append(stats)
        self.prepare(backend)
        if self.async_save:
            self._staging.mark()  # where the training stream is now: what the snapshot must see
            self._snapshotted = threading.Event()
            if self._guard is None:
                self._guard = register_optimizer_step_pre_hook(self._before_optimizer_step)
            assert self._executor is not None
            self._pending = self._executor.submit(
                self._save_steps, backend, step, state, stats, self._background_group(), t0, frozenset(keep)
            )
            stats.save_s = time.perf_counter() - t0
            log.info(
                "step %d: save blocked training %.4f s (snapshot, gather and write in the background)",
                step,
                stats.save_s,
            )
            return self._step_url(step)
        outcome = self._save_steps(backend, step, state, stats, None, t0, frozenset(keep))
        stats.save_s = time.perf_counter() - t0
        log.info("step %d: save blocked training %.4f s", step, stats.save_s)
        return self._step_url(step) if self._apply_policy(outcome) else None

    def prepare(self, backend: Backend) -> None:
        """Not a collective: read what a save needs of the model itself (the adapter's layout; on rank 0, the
        adapter config and the base fingerprint) once, here on the training thread. The trainer calls it at start,
        so that the first save stalls like the later ones; :meth:`save` calls it too (a no-op once done). The
        background thread then touches only tensors: under ZeRO-3, reading a module's parameters while a forward
        runs all-gathers them, a collective of one rank. An error here is raised again, and agreed by every rank,
        in the save's prepare step."""
        with contextlib.suppress(Exception):
            backend.adapter()
            if _rank() == 0:
                self._static_meta(backend)

    def wait(self) -> SaveOutcome | None:
        """Collective: wait for a background save and apply ``on_error`` to its agreed outcome (raise: on every
        rank alike). Returns the outcome (None when no save was pending)."""
        outcome = self._settle()
        if outcome is not None:
            self._apply_policy(outcome)
        return outcome

    def wait_snapshot(self) -> float:
        """Not a collective: block until the pending save's snapshot is taken; returns the seconds waited."""
        event = self._snapshotted
        if event is None or event.is_set():
            return 0.0
        t0 = time.perf_counter()
        event.wait()
        return time.perf_counter() - t0

    def close(self) -> None:
        """Not a collective: let a background write finish (for exit paths where the other ranks may be gone)."""
        if self._pending is not None:
            self._outcome = self._pending.result()  # _save_steps never raises: its outcome is its value
            self._pending = None
        self._snapshotted = None
        if self._guard is not None:  # removed here, on the training thread, never while a step runs the hooks
            self._guard.remove()
            self._guard = None

    # ------------------------------------------------------------------------------------------ internals

    def _step_url(self, step: int) -> str:
        return f"{self.dir.rstrip('/')}/{step_name(step)}"

    def _settle(self) -> SaveOutcome | None:
        """Wait for the pending background save; its agreed outcome (None when nothing was pending)."""
        self.close()
        outcome, self._outcome = self._outcome, None
        return outcome

    def _apply_policy(self, outcome: SaveOutcome) -> bool:
        """``on_error`` on an agreed outcome, the same on every rank: True if it committed; a failure is raised
        ("raise") or logged, counted and passed to ``on_failure`` ("warn")."""
        if outcome.failure is None:
            return True
        error = outcome.failure.exception(outcome.local_error)
        if self.on_error == "raise":
            raise error
        self.failures += 1
        self.failed_steps.append(outcome.step)
        log.error(
            "saving step %d failed%s; training goes on (on_error=warn): %s: %s",
            outcome.step,
            outcome.failure.where,
            outcome.failure.type_name,
            outcome.failure.message,
        )
        if self.on_failure is not None:
            self.on_failure(error)
        return False

    def _meta(self, backend: Backend, step: int, trainer_state: dict[str, Any] | CheckpointError) -> StepMeta:
        """What the step's JSON files say besides the tensors (rank 0; the model-derived part computed once)."""
        failpoint("save.meta")
        if isinstance(trainer_state, CheckpointError):
            raise trainer_state
        adapter_config, fingerprint, aliases = self._static_meta(backend)
        optimizer = backend.stepping_optimizer()
        return StepMeta(
            step=step,
            bias=backend.bias,
            adapter_config=adapter_config,
            fingerprint=fingerprint,
            trainer_state=trainer_state,
            world_size=backend.world_size,
            backend=backend.name,
            optimizer=type(optimizer).__name__ if optimizer is not None else None,
            aliases=aliases,
        )

    def _static_meta(self, backend: Backend) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
        """adapter_config.json's content, the base fingerprint and the adapter's tied keys: the same for every step
        of a model."""
        key = id(backend.model)
        if self._static is None or self._static[0] != key:
            model = backend.model
            static = (adapter_config_dict(model, backend.bias), base_fingerprint(model), adapter_aliases(model))
            self._static = (key, static)
        return self._static[1]

    def _background_group(self) -> Any:
        """A gloo group of all ranks for background gathers (None alone); made once, by every rank."""
        if self._group is None and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            self._group = torch.distributed.new_group(backend="gloo", timeout=group_timeout())
            _GROUPS.append(self._group)
        return self._group

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: an optimizer must not change the adapter before its snapshot is taken."""
        waited = self.wait_snapshot()
        if waited > 0 and self.history:
            self.history[-1].snapshot_wait_s += waited
            log.info("an optimizer step waited %.4f s for the snapshot of step %d", waited, self.history[-1].step)

    def _save_steps(
        self,
        backend: Backend,
        step: int,
        trainer_state: dict[str, Any] | CheckpointError,
        stats: SaveStats,
        group: Any,
        t0: float,
        keep: frozenset[int] = frozenset(),
    ) -> SaveOutcome:
        """Every rank, on the training thread (synchronous) or the save thread (asynchronous, over ``group``):

        1. prepare: this rank's pieces (asynchronous: the snapshot) and, on rank 0, the step's metadata; agreed;
        2. gather the adapter to rank 0; 3. rank 0 serializes, writes and commits; 4. the outcome is agreed.
        A failure anywhere is one :class:`Failure` that every rank holds. Never raises."""
        error: BaseException | None = None
        pieces: list[LocalPiece] | None = None
        meta: StepMeta | None = None
        try:
            try:
                failpoint("save.prepare")
                if self.async_save:
                    start = time.perf_counter()
                    pieces = backend.snapshot(self._staging)
                    stats.snapshot_s = time.perf_counter() - start
                else:
                    pieces = backend.local_pieces()
                if _rank() == 0:
                    meta = self._meta(backend, step, trainer_state)
            except Exception as e:
                error = e
            finally:
                if self._snapshotted is not None:
                    self._snapshotted.set()  # optimizer steps go on; after a failure there is nothing to wait for
            failure = agree(error, group)
            if failure is None:
                try:
                    state = gather_adapter(backend, self.bucket_bytes, pieces=pieces, group=group)
                    failpoint("save.after_gather")
                    if state is not None and meta is not None:
                        self._write(state, meta, stats, keep)
                except Exception as e:
                    error = e
                failure = agree(error, group)
        except Exception as e:  # a peer is gone: the outcome cannot be agreed, so this save counts as failed here
            error = error or e
            failure = Failure.of(_rank(), error)
        if failure is not None:
            log.error(
                "step %d: saving failed%s, the step is not committed: %s: %s",
                step,
                failure.where,
                failure.type_name,
                failure.message,
            )
        stats.done_s = time.perf_counter() - t0
        return SaveOutcome(step, failure, error)

    def _write(self, state: AdapterState, meta: StepMeta, stats: SaveStats, keep: frozenset[int]) -> None:
        """Rank 0: serialize, write and commit."""
        t0 = time.perf_counter()
        if self.lease is not None:
            self.lease.check()  # another run took the dir over: write nothing there
        failpoint("save.serialize")
        files = serialize_step(state, meta)
        url = write_step(self.storage, files, meta.step, self.keep_last, keep=keep)
        stats.write_s, stats.bytes = time.perf_counter() - t0, sum(len(b) for b in files.values())
        log.info("step %d: committed %s (%.2f MB), write %.3f s", meta.step, url, stats.bytes / 1e6, stats.write_s)
