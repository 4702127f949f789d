"""One writer per checkpoint dir: a lease object, taken exclusively, renewed while the run lives.

Two jobs saving into one ``checkpoint.dir`` would interleave their steps and their retention would delete each
other's. So a run takes ``<dir>/.dist_lora_lease.json`` before its first step, with an exclusive write (a
conditional PUT, ``If-None-Match: *``, on S3; a hard link locally), and rank 0 renews it in the background every
``ttl / 3`` seconds. A second run finds it and is refused, with an error that names the holder.

Restarts after a crash must not be locked out: a lease holding the *same* run id (the scheduler's job id, or
``checkpoint.run_id``) is taken over at once, so is one whose holder is provably dead (same host, its pid gone or
now another process), and any lease not renewed for ``ttl`` seconds is stale and may be taken over by anyone. A
run that ends normally, fails to start, or is preempted and saved releases its lease.

Takeovers and renewals are conditional writes (``If-Match`` on S3, a compare-and-replace under ``flock``
locally): a takeover never replaces a rival's fresh lease, and a renewal never overwrites a takeover. fsspec
filesystems without conditional writes (memory://, ...) get a best-effort lease, with a warning at start.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from dist_lora.checkpoint import CheckpointError
from dist_lora.constants import LEASE_NAME, RUN_ID_ENVS, VERSION
from dist_lora.storage import AlreadyExistsError, ChangedError, Storage

log = logging.getLogger(__name__)


class LeaseError(CheckpointError):
    """Another live run holds the checkpoint dir, or took it over from this one."""


_PROCESS_RUN_IDS: dict[int, str] = {}  # pid -> its run id (a forked process draws its own)


def default_run_id() -> str:
    """The scheduler's idea of this job (stable across its restarts), else an id of this process, the same for
    every run it starts (a ``train()`` started again in a notebook after one raised takes its own lease over)."""
    for name in RUN_ID_ENVS:
        value = os.environ.get(name)
        if value and value != "none":
            return value
    return _PROCESS_RUN_IDS.setdefault(os.getpid(), uuid.uuid4().hex)


_HELD: dict[str, Lease] = {}  # lease URL -> the Lease this process took there last (until released)


def _holder_is_dead(held: dict[str, Any]) -> str | None:
    """Why the lease's holder is provably dead (it ran on this host and its pid is gone, or now names another
    process: one started at another tick since boot, or in another boot), or None when that cannot be known."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return None
    pid = int(held["pid"])
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"whose process {pid} on this host is gone"
    except PermissionError:  # alive, another user's
        return None
    boot, recorded_boot = _boot_id(), held.get("boot_id")
    if boot is not None and isinstance(recorded_boot, str) and recorded_boot != boot:
        return f"which ran before this host restarted (pid {pid} is another process now)"
    ticks, recorded_ticks = _process_start_ticks(pid), held.get("pid_start_ticks")
    if ticks is not None and isinstance(recorded_ticks, int) and ticks != recorded_ticks:
        return f"whose pid {pid} now belongs to another process"
    return None


def _process_start_ticks(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (/proc/<pid>/stat's starttime), or None where there is
    no /proc. With the pid and the boot id it names one process for good; unlike an epoch time built from /proc/stat's
    btime, it does not move when the wall clock is stepped (NTP, a VM restored from a snapshot)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


LEASE_IDENTITY = ("run_id", "host", "pid", "acquired_at")
"""The fields of a lease that name the process holding it (the others change as it is renewed)."""


class Lease:
    """The lease of one checkpoint dir for one run; rank 0 only."""

    def __init__(self, storage: Storage, run_id: str, ttl_s: float = 600.0):
        self.storage = storage
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.lost: LeaseError | None = None
        self.superseded = False  # a later run of this process took the lease over (superseded_by)
        self._version = ""  # of the lease as this run last wrote it (see Storage.replace_if)
        self._acquired_at = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.storage.url_of(LEASE_NAME)

    def _body(self, acquired_at: float | None = None) -> bytes:
        now = time.time()
        if acquired_at:
            self._acquired_at = acquired_at
        record = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start_ticks": _process_start_ticks(os.getpid()),
            "boot_id": _boot_id(),
            "acquired_at": acquired_at or self._acquired_at,
            "renewed_at": now,
            "ttl_s": self.ttl_s,
            "dist_lora_version": VERSION,
        }
        return json.dumps(record, indent=1).encode()

    def read(self) -> dict[str, Any] | None:
        """The lease as stored, None if there is none; an unreadable one is reported as such."""
        found = self._read_versioned()
        return found[0] if found else None

    def _read_versioned(self) -> tuple[dict[str, Any], str] | None:
        try:
            raw, version = self.storage.read_versioned(LEASE_NAME)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(raw)
            float(record["renewed_at"]), float(record["ttl_s"]), str(record["run_id"])
        except (ValueError, KeyError, TypeError) as e:
            raise LeaseError(
                f"{self.url} is not a dist_lora lease ({type(e).__name__}: {e}); if no run writes to this dir, "
                "remove that file"
            ) from e
        return dict(record), version

    def acquire(self) -> None:
        """Take the lease, or raise LeaseError naming the live run that holds it (see :meth:`_acquire`). A lease
        this process took earlier for the same run, and did not release (a ``train()`` that raised), is taken over
        and stops renewing."""
        self._acquire()
        _HELD[self.url] = self

    def superseded_by(self, later: Lease) -> None:
        """Stop renewing: a later run of this process takes the lease over (a save of this one then fails)."""
        self.stop_heartbeat()
        self.superseded = True
        self.lost = LeaseError(
            f"the lease {self.url} was taken over by a later run of this process (run {later.run_id}): this run "
            "stops saving there"
        )

    def _acquire(self) -> None:
        """Take the lease, or raise LeaseError naming the live run that holds it.

        A free dir is taken with an exclusive create. A lease of this same run, a stale one, or one whose holder
        is provably dead (this host, its pid gone) is replaced conditionally, only if it is still the version that
        was read: of two runs taking one stale lease over, one wins and the other is refused; a fresh lease is
        never replaced."""
        earlier = _HELD.get(self.url)
        if earlier is not None and earlier is not self and earlier.run_id == self.run_id:
            earlier.superseded_by(self)  # (before the takeover: its renewals would race it)
        if not self.storage.conditional_writes:
            log.warning(
                "%s has no conditional writes (only local paths and S3 do): the one-writer lease of %s is "
                "best-effort; do not point two jobs at it",
                self.storage.protocol,
                self.storage.url,
            )
        body = self._body()
        try:
            self.storage.write(LEASE_NAME, body, exclusive=True)
            self._version = self.storage.read_versioned(LEASE_NAME)[1]
            return
        except AlreadyExistsError:
            pass
        found = self._read_versioned()
        if found is None:  # released between our write and our read: try once more, exclusively
            self.storage.write(LEASE_NAME, body, exclusive=True)
            self._version = self.storage.read_versioned(LEASE_NAME)[1]
            return
        held, version = found
        age = time.time() - float(held["renewed_at"])
        dead = _holder_is_dead(held)
        if held["run_id"] == self.run_id:
            log.info("taking over the lease of %s from an earlier attempt of run %s", self.storage.url, self.run_id)
        elif dead is not None:
            log.warning("the lease of %s is held by run %s, %s: taking over", self.storage.url, held["run_id"], dead)
        elif age > float(held["ttl_s"]):
            log.warning(
                "the lease of %s held by run %s (host %s) was last renewed %.0f s ago (ttl %.0f s): stale, taking over",
                self.storage.url,
                held["run_id"],
                held.get("host"),
                age,
                float(held["ttl_s"]),
            )
        else:
            wait = float(held["ttl_s"]) - age
            raise LeaseError(
                f"{self.storage.url} is being written by run {held['run_id']} (host {held.get('host')}, pid "
                f"{held.get('pid')}, lease renewed {age:.0f} s ago). Two jobs saving to one checkpoint.dir would "
                "overwrite each other's steps. Use another checkpoint.dir; or, if that run is dead, restart with its "
                f"run id (checkpoint.run_id or DIST_LORA_RUN_ID={held['run_id']}), wait {wait:.0f} s for its lease "
                f"to expire, or remove {self.url}"
            )
        acquired_at = float(held.get("acquired_at") or 0) if held["run_id"] == self.run_id else None
        try:
            self._version = self.storage.replace_if(LEASE_NAME, self._body(acquired_at or None), version)
        except ChangedError:
            raise LeaseError(
                f"another run took over the lease {self.url} first (it changed while this run was taking it over)"
            ) from None

    def renew(self) -> None:
        """Rewrite the lease with a fresh time, only if it is still the version this run wrote; LeaseError if
        another run has taken it over meanwhile (a renewal never overwrites a takeover)."""
        try:
            self._version = self.storage.replace_if(LEASE_NAME, self._body(self._acquired_at), self._version)
        except ChangedError:
            held = self.read()
            holder = f"run {held['run_id']} (host {held.get('host')})" if held else "nobody (it was removed)"
            raise LeaseError(
                f"the lease {self.url} was taken over by {holder}: another job writes to this checkpoint dir now; "
                "this run stops saving there"
            ) from None

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still ours (not if a later run of this process took it
        over: it holds the same run id and pid)."""
        self.stop_heartbeat()
        if self.superseded:
            return
        if _HELD.get(self.url) is self:
            del _HELD[self.url]
        try:
            held = self.read()
            if held is not None and held["run_id"] == self.run_id and held.get("pid") == os.getpid():
                self.storage.delete(LEASE_NAME)
        except Exception as e:  # it expires on its own
            log.warning("could not release the lease %s: %s", self.url, e)

    def start_heartbeat(self) -> None:
        """Renew every ttl/3 seconds in a background thread, until release()."""

        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except LeaseError as e:
                    self.lost = e
                    log.error("%s", e)
                    return
                except Exception as e:  # the store is unreachable now; the next beat tries again
                    log.warning("could not renew the lease %s: %s", self.url, e)

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="dist-lora-lease", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self) -> None:
        """Raise if the heartbeat found the lease taken over by another run."""
        if self.lost is not None:
            raise self.lost
