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

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dist_lora.backends import Backend, LocalPiece
from dist_lora.backends.base import Staging
from dist_lora.checkpoint import AdapterState, CheckpointError, StepMeta, serialize_step, step_name, write_step
from dist_lora.faults import failpoint
from dist_lora.gather import any_rank, broadcast_json, gather_adapter
from dist_lora.lease import Lease, LeaseError, default_run_id
from dist_lora.lora import adapter_config_dict, base_fingerprint
from dist_lora.storage import RetryPolicy, Storage, StorageError

log = logging.getLogger(__name__)


T = TypeVar("T")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


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

    def __init__(
        self,
        dir: str,
        *,
        keep_last: int | None = None,
        storage_options: dict[str, Any] | None = None,
        bucket_mb: float = 32.0,
        async_save: bool = False,
        retry: RetryPolicy | None = None,
        on_error: str = "raise",
        on_failure: Callable[[BaseException], None] | None = None,
    ):
        """``on_error``: what a failed save (after its retries) does. "raise": :meth:`save` or :meth:`wait` raises
        it on every rank. "warn": it is logged, counted in ``failures`` and passed to ``on_failure``; training
        goes on and the next save still runs."""
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be raise or warn (got {on_error!r})")
        self.dir = dir
        self.keep_last = keep_last
        self.storage_options = storage_options
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.async_save = async_save
        self.retry = retry
        self.on_error = on_error
        self.on_failure = on_failure
        self.failures = 0
        self.history: list[SaveStats] = []
        self._storage: Storage | None = None
        self._executor: ThreadPoolExecutor | None = None  # one long-lived worker: no thread start per save
        self._pending: Future[None] | None = None
        self._staging = Staging()
        self._snapshotted: threading.Event | None = None  # set once the pending save's snapshot is taken
        self._guard: Any = None  # the optimizer step pre-hook that waits for it
        self._result: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self.lease: Lease | None = None
        self._static: tuple[int, tuple[dict[str, Any], dict[str, Any]]] | None = None
        self._group: Any = None

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = Storage(self.dir, self.storage_options, self.retry)
        return self._storage

    def take_lease(self, run_id: str | None = None, ttl_s: float = 600.0) -> None:
        """Collective: take the dir's writer lease on rank 0 and renew it in the background (see lease.py).

        Raises LeaseError on every rank when another live run holds the dir.
        """
        error: BaseException | None = None
        result: dict[str, Any] = {"ok": True}
        if _rank() == 0:
            try:
                lease = Lease(self.storage, run_id or default_run_id(), ttl_s)
                lease.acquire()
                lease.start_heartbeat()
                self.lease = lease
            except Exception as e:
                error, result = e, {"ok": False, "error": f"{type(e).__name__}: {e}"}
        result = broadcast_json(result)
        if not result["ok"]:
            raise error if error is not None else LeaseError(result["error"])

    def release_lease(self) -> None:
        """Not a collective: rank 0 gives the lease up (after the last save committed)."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def save(self, backend: Backend, *, step: int, trainer_state: dict[str, Any] | None = None) -> str | None:
        """Collective: snapshot the adapter at ``step`` and commit it (now, or in the background). Returns its URL
        (None when it failed under ``on_error="warn"``).

        Asynchronous: returns at once. A background thread copies this rank's shard of the adapter and its Adam
        state (the snapshot), then gathers and writes. Until the snapshot is taken, any ``torch.optim`` optimizer
        step in this process first waits for it (a pre-hook; the time is ``SaveStats.snapshot_wait_s``), so the
        step saved is exactly the state at this call. Change adapter weights outside an optimizer step only after
        :meth:`wait_snapshot`.

        Raises here, on every rank, if the previous background save failed (``on_error="warn"``: reports it, and
        this save still runs).
        """
        if self.on_error == "warn":
            self.wait()  # an earlier background failure is reported, and does not stop this save
        return self._under_policy(f"saving step {step}", lambda: self._save(backend, step, trainer_state))

    def wait(self) -> None:
        """Collective: wait for a background save; raise on every rank if it failed (``on_error="raise"``)."""
        self._under_policy("a background save", self._settle)

    def _save(self, backend: Backend, step: int, trainer_state: dict[str, Any] | None) -> str:
        t0 = time.perf_counter()
        stats = SaveStats(step=step)
        self.history.append(stats)
        meta = self._meta(backend, step, trainer_state) if _rank() == 0 else None
        if self.async_save:
            self._settle()  # the previous save is done (its failure is raised here, on every rank)
            self._staging.mark()  # where the training stream is now: what the snapshot must see
            self._snapshotted = threading.Event()
            if self._guard is None:
                self._guard = register_optimizer_step_pre_hook(self._before_optimizer_step)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dist-lora-save")
            self._pending = self._executor.submit(
                self._snapshot_gather_write, backend, meta, stats, self._background_group(), self._snapshotted, t0
            )
        else:
            self._gather_and_write(backend, None, meta, stats, None)
            self._settle()
            stats.done_s = time.perf_counter() - t0
        stats.save_s = time.perf_counter() - t0
        log.info(
            "step %d: save blocked training %.4f s%s",
            step,
            stats.save_s,
            " (snapshot, gather and write in the background)" if self.async_save else "",
        )
        return self.storage.url_of(step_name(step)) if _rank() == 0 else f"{self.dir.rstrip('/')}/{step_name(step)}"

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
            self._pending.result()  # _snapshot_gather_write never raises: its outcome is in self._result
            self._pending = None
        self._snapshotted = None
        if self._guard is not None:  # removed here, on the training thread, never while a step runs the hooks
            self._guard.remove()
            self._guard = None

    # ------------------------------------------------------------------------------------------ internals

    def _under_policy(self, what: str, fn: Callable[[], T]) -> T | None:
        """``fn()`` under ``on_error``. A failure reaches every rank alike, so every rank goes the same way."""
        try:
            return fn()
        except (CheckpointError, StorageError) as e:  # LeaseError is a CheckpointError
            if self.on_error == "raise":
                raise
            self.failures += 1
            log.error("%s failed; training goes on (on_error=warn): %s: %s", what, type(e).__name__, e)
            if self.on_failure is not None:
                self.on_failure(e)
            return None

    def _meta(self, backend: Backend, step: int, trainer_state: dict[str, Any] | None) -> StepMeta:
        """What the step's JSON files say besides the tensors (rank 0; the model-derived part computed once)."""
        key = id(backend.model)
        if self._static is None or self._static[0] != key:
            static = (adapter_config_dict(backend.model, backend.bias), base_fingerprint(backend.model))
            self._static = (key, static)
        adapter_config, fingerprint = self._static[1]
        return StepMeta(
            step=step,
            bias=backend.bias,
            adapter_config=adapter_config,
            fingerprint=fingerprint,
            trainer_state=dict(trainer_state or {}),
            world_size=backend.world_size,
            backend=backend.name,
        )

    def _background_group(self) -> Any:
        """A gloo group of all ranks for background gathers (None alone); made once, by every rank."""
        if self._group is None and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            self._group = torch.distributed.new_group(backend="gloo")
        return self._group

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Optimizer step pre-hook: an optimizer must not change the adapter before its snapshot is taken."""
        waited = self.wait_snapshot()
        if waited > 0 and self.history:
            self.history[-1].snapshot_wait_s += waited
            log.info("an optimizer step waited %.4f s for the snapshot of step %d", waited, self.history[-1].step)

    def _snapshot_gather_write(
        self, backend: Backend, meta: StepMeta | None, stats: SaveStats, group: Any, snapshotted: Any, t0: float
    ) -> None:
        """Background: copy this rank's pieces (then let optimizer steps go on), gather, write. Never raises."""
        try:
            start = time.perf_counter()
            pieces = backend.snapshot(self._staging)
            stats.snapshot_s = time.perf_counter() - start
        except Exception as e:  # gathering nothing: the ranks then disagree on the adapter and all fail the save
            log.error("step %d: taking the snapshot failed: %s: %s", stats.step, type(e).__name__, e)
            self._error = e
            pieces = []
        finally:
            snapshotted.set()
        self._gather_and_write(backend, pieces, meta, stats, group)
        stats.done_s = time.perf_counter() - t0

    def _gather_and_write(
        self,
        backend: Backend,
        pieces: list[LocalPiece] | None,
        meta: StepMeta | None,
        stats: SaveStats,
        group: Any,
    ) -> None:
        """Every rank: gather the adapter to rank 0; rank 0: serialize, write and commit; then every rank agrees
        on the outcome, which :meth:`_settle` raises if it failed. Never raises."""
        step = stats.step
        try:
            state = gather_adapter(backend, self.bucket_bytes, pieces=pieces, group=group)
            failpoint("save.after_gather")
        except Exception as e:
            self._error = self._error or e  # a failed snapshot (see above) is the cause, not the disagreement
            self._result = {"ok": False, "error": f"gathering step {step} failed: {type(e).__name__}: {e}"}
            log.error("step %d: gathering the adapter failed, the step is not committed: %s", step, e)
            state = None
        if state is not None and meta is not None and self._error is None:
            self._write(state, meta, stats)
        elif self._error is not None and self._result is None:  # a failed snapshot, alone (world size 1)
            self._result = {"ok": False, "step": step, "error": f"{type(self._error).__name__}: {self._error}"}
        try:
            self._agree(step, group)
        except Exception as e:  # a peer is gone: the outcome cannot be agreed, so this save counts as failed
            self._error = self._error or e
            self._result = {"ok": False, "step": step, "error": f"{type(e).__name__}: {e}"}

    def _write(self, state: AdapterState, meta: StepMeta, stats: SaveStats) -> None:
        """Rank 0: serialize, write and commit; records the outcome. Never raises."""
        step = stats.step
        t0 = time.perf_counter()
        try:
            if self.lease is not None:
                self.lease.check()  # another run took the dir over: write nothing there
            files = serialize_step(state, meta)
            url = write_step(self.storage, files, step, self.keep_last)
            stats.write_s, stats.bytes = time.perf_counter() - t0, sum(len(b) for b in files.values())
            self._result = {"ok": True, "url": url}
            log.info("step %d: committed %s (%.2f MB), write %.3f s", step, url, stats.bytes / 1e6, stats.write_s)
        except Exception as e:  # reported now, raised on every rank at the next collective
            self._error = e
            self._result = {"ok": False, "error": f"{type(e).__name__}: {e}", "step": step}
            log.error("step %d: saving failed, the step is not committed: %s: %s", step, type(e).__name__, e)

    def _settle(self) -> None:
        """Wait for the pending save; raise its failure, on every rank alike (the outcome was agreed by then)."""
        self.close()
        result = self._result if self._result is not None else {"ok": True}
        error, self._result, self._error = self._error, None, None
        if result.get("ok"):
            return
        if error is not None:
            raise error
        raise CheckpointError(f"saving step {result.get('step')} failed: {result.get('error') or 'see the log'}")

    def _agree(self, step: int, group: Any) -> None:
        """Collective (over ``group``): every rank learns whether the save succeeded everywhere, and rank 0's error.

        One tiny all-reduce when all went well; the background thread runs it, so it never stalls training."""
        mine = self._result if self._result is not None else {"ok": True}
        if any_rank(not mine.get("ok"), group):
            agreed = broadcast_json(mine if mine.get("error") else {**mine, "ok": False}, group)
            self._result = {"ok": False, "step": step, "error": agreed.get("error") or mine.get("error")}
        else:
            self._result = {"ok": True}
