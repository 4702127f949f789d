"""Named fail points for crash tests: ``DIST_LORA_FAILPOINT=NAME[@rankN]`` kills the process (SIGKILL) there.

A save passes these points, in order: ``save.after_gather``, then for each data file ``write.before:FILE``,
``write.partial:FILE`` (local storage: half of the bytes are in the temporary file), ``write.after:FILE``; then
``commit.before_manifest``, ``commit.after_manifest``, ``commit.after_latest``; retention passes
``retention.after_manifest_delete`` and ``retention.after_file_delete``. Nothing happens unless the variable is
set; the crash suite (tests/test_crash.py) sets it in the process it kills.
"""

from __future__ import annotations

import os
import signal

from dist_lora.constants import ENV_FAILPOINT


def failpoint(name: str) -> None:
    spec = os.environ.get(ENV_FAILPOINT)
    if not spec:
        return
    point, _, rank = spec.partition("@rank")
    if point == name and (not rank or rank == os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
