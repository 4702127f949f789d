"""Per-step metrics: one JSON line per step (and per resume) in a local file; TensorBoard beside it; Weights &
Biases. Rank 0 writes; every write is best-effort (a sink that fails is logged once and dropped, never ending rank
0 while the other ranks wait in a collective)."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "save_stall_s", "peak_memory_gib")


def step_peak_memory(device: Any) -> int | None:
    """Peak memory, in bytes: on a GPU the most torch allocated on ``device`` since the last call
    (``max_memory_allocated``, then reset); on the CPU the process's resident peak so far (the kernel's VmHWM, which
    is left alone: tools that read the process's peak, a launcher's accounting, keep seeing the load's). None where
    it cannot be read."""
    import torch

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(peak)
    try:
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):  # not Linux
        return None


class MetricsLog:
    """Rank 0's metrics sinks; a no-op elsewhere. ``report_to``: ``train.report_to`` (None: TensorBoard where it is
    installed and there is a ``path``). ``config``: the run's config, which W&B shows with the run.

    A W&B run is started at the first row it gets, under :attr:`wandb_id`: fresh for a new run, the saved run's
    after a resume (the trainer sets it from the step), so that a job resumed after a preemption, at any world size,
    goes on in the same W&B run (``resume="allow"``)."""

    def __init__(
        self,
        path: str | None,
        *,
        enabled: bool = True,
        report_to: list[str] | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.path = Path(path) if path and enabled else None
        self.tb: Any = None
        self.wandb: Any = None  # the W&B run, once started
        self._wandb_from = 0  # the first step W&B takes (a resumed run's: after the last it holds)
        self._wandb_behind = False  # (said once)
        self.wandb_id = secrets.token_hex(4) if enabled and report_to and "wandb" in report_to else None
        self._wandb_config = config or {}
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if report_to is None or "tensorboard" in report_to:
            try:
                self.tb = self._tensorboard()
            except ImportError:  # by default TensorBoard is optional; named in report_to, it was checked
                self.tb = None

    def _tensorboard(self, purge_step: int | None = None) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        assert self.path is not None
        return SummaryWriter(log_dir=str(self.path.parent / "tensorboard"), purge_step=purge_step)

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

    def _to_wandb(self, values: dict[str, float], step: int) -> None:
        """Best-effort, as the file: a W&B error (no API key, the service down) is logged once with the fix, and
        the run trains on without W&B."""
        if self.wandb_id is None:
            return
        try:
            if self.wandb is None:
                import wandb

                project = os.environ.get("WANDB_PROJECT", "dist_lora")
                self.wandb = wandb.init(project=project, id=self.wandb_id, resume="allow", config=self._wandb_config)
                self._wandb_from = int(self.wandb.step)  # a resumed W&B run's next step: past every one it holds
            if step < self._wandb_from:  # W&B would drop it, with a warning at every call
                if not self._wandb_behind:
                    self._wandb_behind = True
                    log.warning(
                        "W&B run %s already holds steps up to %d, logged after the step this run resumed from was "
                        "saved; W&B does not take a step below its last, so this run's steps before %d go to the "
                        "metrics file and TensorBoard only",
                        self.wandb_id,
                        self._wandb_from - 1,
                        self._wandb_from,
                    )
                return
            self.wandb.log(values, step=step)
        except Exception as e:  # anything W&B raises: training goes on
            log.error(
                "cannot log to Weights & Biases (%s: %s); training goes on without it (wandb login, or "
                "WANDB_API_KEY; WANDB_MODE=offline logs to local files to sync later)",
                type(e).__name__,
                e,
            )
            self.wandb_id = None

    def step(self, row: dict[str, Any]) -> None:
        self._append(row)
        scalars = {f"train/{name}": row[name] for name in SCALARS if row.get(name) is not None}
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, row["step"])
        self._to_wandb(scalars, row["step"])

    def eval(self, step: int, loss: float, accuracy: float, *, name: str | None = None) -> None:
        """One eval set's results: ``eval/loss`` and ``eval/accuracy``, or ``eval/NAME/...`` for a named set (and
        ``"set": NAME`` in the file's row)."""
        self._append(
            {
                "event": "eval",
                "step": step,
                **({"set": name} if name else {}),
                "eval_loss": loss,
                "eval_accuracy": accuracy,
            }
        )
        prefix = "eval/" if name is None else f"eval/{name}/"
        scalars = {f"{prefix}loss": loss, f"{prefix}accuracy": accuracy}
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
        self._to_wandb(scalars, step)

    def started(self, **fields: Any) -> None:
        """A fresh run begins (nothing resumed): a ``start`` event, from which ``dist-lora plot`` reads the file as
        this run's alone. A file an earlier run wrote keeps its rows, before this event; the log says so."""
        if self.path is not None and self.path.is_file() and self.path.stat().st_size:
            log.info(
                "train.metrics_file %s holds an earlier run's rows: this run's follow its start event (dist-lora plot "
                "draws this run alone)",
                self.path,
            )
        self.event("start", step=0, **fields)

    def resumed(self, step: int, **fields: Any) -> None:
        """The run goes on from ``step``: a ``resume`` event, and TensorBoard's scalars past it from an earlier
        attempt (logged after its last save, before it died) hidden, as TensorBoard does after a restart
        (``purge_step``), so that its curves are the run's own. The metrics file keeps every row (``dist-lora plot``
        reads the resume events) and W&B keeps what it was sent (it does not rewrite a run's history)."""
        self.event("resume", step=step, **fields)
        if self.tb is not None:
            self.tb.close()
            self.tb = self._tensorboard(purge_step=step + 1)

    def event(self, name: str, **fields: Any) -> None:
        self._append({"event": name, **fields})
        if self.tb is not None:
            self.tb.add_text("events", f"{name}: {fields}", fields.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:
                log.error("cannot finish the Weights & Biases run (%s: %s)", type(e).__name__, e)
            self.wandb = None
