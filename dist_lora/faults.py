"""Named fail points for fault tests: ``DIST_LORA_FAILPOINT=NAME[@rankN]`` kills the process (SIGKILL) there.

A save passes these points, in order: ``save.after_gather``, then for each data file ``write.before:FILE``,
``write.partial:FILE`` (local storage: half of the bytes are in the temporary file), ``write.after:FILE``; then
``commit.before_manifest``, ``commit.after_manifest``, ``commit.after_latest``; retention passes
``retention.after_manifest_delete`` and ``retention.after_file_delete``. Nothing happens unless the variable is
set; the crash suite (tests/test_crash.py) sets it in the process it kills. With several ranks the gather passes
``gather.after_sizes`` and ``gather.after_chunk`` on every rank.

``NAME@peer`` does not kill: rank 0 stops at the point, creates ``$DIST_LORA_FAILPOINT_DIR/reached`` and waits
for ``go`` there, so that a test can kill another rank while rank 0 is exactly there.

``NAME[@rankN]=raise[#K]`` does not kill either: the K-th time (default: the first) this process passes the point
it raises an OSError (ENOSPC, as a full disk would), to test that every rank handles an error of one rank alike.
Rank-0-only points: ``lease.acquire``, ``load.read``, ``save.meta``, ``save.serialize``, ``commit.latest`` and
the write points above; ``save.prepare`` (taking this rank's pieces or snapshot) is passed on every rank.
Several specs are separated by commas.
"""

from __future__ import annotations

import errno
import os
import signal
import time

from dist_lora.constants import ENV_FAILPOINT, ENV_FAILPOINT_DIR, ENV_RANK

_passes: dict[str, int] = {}


def failpoint(name: str) -> None:
    specs = os.environ.get(ENV_FAILPOINT)
    if not specs:
        return
    for spec in specs.split(","):
        _at(name, spec)


def _at(name: str, spec: str) -> None:
    spec, _, action = spec.partition("=")
    if spec == f"{name}@peer":
        if os.environ.get(ENV_RANK, "0") == "0":
            _pause_for_peer_kill()
        return
    point, _, rank = spec.partition("@rank")
    if point != name or (rank and rank != os.environ.get(ENV_RANK, "0")):
        return
    if action.startswith("raise"):
        _passes[name] = _passes.get(name, 0) + 1
        if _passes[name] == int(action.partition("#")[2] or 1):
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _pause_for_peer_kill(timeout_s: float = 120.0) -> None:
    directory = os.environ[ENV_FAILPOINT_DIR]
    with open(os.path.join(directory, "reached"), "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(os.path.join(directory, "go")) and time.monotonic() < deadline:
        time.sleep(0.05)
