"""Logging: rank 0 talks at INFO, other ranks only warn, unless --verbose."""

from __future__ import annotations

import logging
import os

from dist_lora.constants import ENV_LOG_LEVEL, ENV_RANK


def setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get(ENV_RANK, "0"))
    level = os.environ.get(ENV_LOG_LEVEL) or ("DEBUG" if verbose else "INFO" if rank == 0 else "WARNING")
    fmt = f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, datefmt="%H:%M:%S", force=True)
    logging.getLogger("dist_lora").setLevel(level)
