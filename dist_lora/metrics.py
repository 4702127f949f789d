"""Per-step metrics: one JSON line per step (and per resume) in a local file, and TensorBoard when installed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "save_stall_s")


class MetricsLog:
    """Rank 0's metrics sink; a no-op elsewhere or without a path."""

    def __init__(self, path: str | None, *, enabled: bool = True):
        self.path = Path(path) if path and enabled else None
        self.tb: Any = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            self.tb = None

    def _append(self, row: dict[str, Any]) -> None:
        """Best-effort: this runs on rank 0 alone between collectives, so a write error (a full disk) must not
        end rank 0 while the others wait; it is logged once and the file is no longer written."""
        if self.path is None:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            log.error("cannot write the metrics file %s (%s); training goes on without it", self.path, e)
            self.path = None

    def step(self, row: dict[str, Any]) -> None:
        self._append(row)
        if self.tb is not None:
            for name in SCALARS:
                if name in row:
                    self.tb.add_scalar(f"train/{name}", row[name], row["step"])

    def eval(self, step: int, loss: float) -> None:
        self._append({"event": "eval", "step": step, "eval_loss": loss})
        if self.tb is not None:
            self.tb.add_scalar("eval/loss", loss, step)

    def event(self, name: str, **fields: Any) -> None:
        self._append({"event": name, **fields})
        if self.tb is not None:
            self.tb.add_text("events", f"{name}: {fields}", fields.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
