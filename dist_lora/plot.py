"""``dist-lora plot RUN_DIR``: the loss curve from a run's metrics JSONL, with resume points and failed saves
marked, and the steps a resume went back past (logged after the last save of an attempt that then died) drawn apart
from the run's own."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_lora.constants import TRAINER_STATE_NAME
from dist_lora.data import jsonl_rows


@dataclass
class Metrics:
    """A run's metrics JSONL as its history stands: the file keeps every row ever written, and a resume goes back
    to its step, so the rows of steps past it that an earlier attempt had logged (after its last save, before a
    crash; or a resume from an older step) are ``superseded``, not the run's."""

    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    resumes: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # save_failed events (of the steps kept)
    superseded: list[dict] = field(default_factory=list)  # step rows a later resume went back past


def read_metrics(path: Path) -> Metrics:
    """A metrics JSONL written by the trainer, read as :class:`Metrics`: the rows of its last run, after the last
    ``start`` event (a fresh run; the rows of an earlier run that wrote the same file are before it); events other
    than resumes, evaluations and failed saves are left out."""
    out = Metrics()
    for _, row in jsonl_rows(path):
        event = row.get("event")
        if event == "start":
            out = Metrics()
        elif event == "resume":
            resumed = row["step"]
            out.superseded += [r for r in out.steps if r["step"] > resumed]
            out.steps = [r for r in out.steps if r["step"] <= resumed]
            out.evals = [r for r in out.evals if r["step"] <= resumed]
            out.failed = [r for r in out.failed if r["step"] <= resumed]
            out.resumes.append(row)
        elif event == "eval":
            out.evals.append(row)
        elif event == "save_failed":
            out.failed.append(row)
        elif event is None and "loss" in row:
            out.steps.append(row)
    return out


def eval_curves(metrics: Metrics, value: str = "eval_loss") -> dict[str | None, tuple[list[int], list[float]]]:
    """Each eval set's curve of ``value`` (``eval_loss`` or ``eval_accuracy``) as (steps, values), in the order the
    sets were first logged; an unnamed set under None; a step logged twice keeps its latest row, and a row without
    the value (an accuracy logged before it was) is left out."""
    sets: dict[str | None, dict[int, float]] = {}
    for r in metrics.evals:
        if r.get(value) is not None:
            sets.setdefault(r.get("set"), {})[r["step"]] = r[value]
    return {name: (sorted(last), [last[s] for s in sorted(last)]) for name, last in sets.items()}


def _unstack(fig: Any, ax: Any, labels: list[Any]) -> None:
    """Move each resume label down, below the ones before it, until it overlaps none of them (resumes a few steps
    apart would otherwise print over each other)."""
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for label in labels:
        for _ in range(len(placed) + 1):
            box = label.get_window_extent(renderer)
            hits = [other for other in placed if box.overlaps(other)]
            if not hits:
                break
            lowest = min(other.y0 for other in hits)  # below the one in the way, in display coordinates
            _, y = ax.transData.inverted().transform((box.x1, lowest - 2))
            label.xyann = (label.xyann[0], y)  # where the text stands (its top: va="top")
        placed.append(label.get_window_extent(renderer))


def metrics_path(run: str | Path) -> Path:
    """The metrics JSONL of ``run``: the file itself, a dir holding ``metrics.jsonl``, or a local checkpoint dir or
    one of its steps, whose saved run config names it (``train.metrics_file``, as the run wrote it)."""
    from dist_lora.checkpoint import parse_step_name, saved_config

    path = Path(run)
    if path.is_file():
        return path
    if (path / "metrics.jsonl").is_file():
        return path / "metrics.jsonl"
    steps = {parse_step_name(p.name): p for p in path.iterdir()} if path.is_dir() else {}
    newest_first = [steps[n] for n in sorted((n for n in steps if n is not None), reverse=True)]
    for step in [*newest_first, path]:  # (the dir itself: a step)
        try:
            state = json.loads((step / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError):  # (a step being written, or not a step)
            continue
        config = saved_config(state) if isinstance(state, dict) else {}
        if not config:  # (a step of a loop of one's own or of HF Trainer: no run config)
            continue
        named = config.get("train", {}).get("metrics_file")
        if named is None:
            raise ValueError(
                f"{path}: its run wrote no metrics file (train.metrics_file was not set, {step.name}'s config "
                "says): set train.metrics_file to draw a run's curve"
            )
        if not Path(named).is_file():
            raise ValueError(
                f"{path}: its run's train.metrics_file {named} is not found (another machine's?): pass the file"
            )
        return Path(named)
    raise ValueError(
        f"{path} does not exist or holds no metrics.jsonl and no step: pass a run dir holding metrics.jsonl, a "
        "checkpoint dir of a run that set train.metrics_file, or the JSONL itself"
    )


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw train (and eval) loss against step to a PNG (default: next to the metrics file), and each eval set's
    token accuracy on an axis of its own at the right; returns its path. ``out``: a file (its extension picks the
    format, .png where it has none; its directory made where missing) or a directory (``loss.png`` in it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = metrics_path(run)
    metrics = read_metrics(path)
    steps = metrics.steps
    if not steps:
        raise ValueError(f"{path} holds no step rows")
    out_path = _plot_path(out, path.with_name("loss.png"), FigureCanvasAgg.get_supported_filetypes())
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1.2, label="train loss")
    if metrics.superseded:  # each run of consecutive steps its own segment
        label: str | None = "superseded by a resume"
        for segment in _consecutive(metrics.superseded):
            x, y = [r["step"] for r in segment], [r["loss"] for r in segment]
            ax.plot(x, y, color="0.6", lw=1, ls=":", marker=".", ms=3, label=label)
            label = None
    color = {}  # each eval set's, for its loss and its accuracy
    for name, (x, y) in eval_curves(metrics).items():
        (line,) = ax.plot(x, y, "o-", lw=1.2, ms=4, label="eval loss" if name is None else f"eval loss: {name}")
        color[name] = line.get_color()
    accuracy = eval_curves(metrics, "eval_accuracy")
    right: Any = None  # the accuracy's axis, where there is one
    if accuracy:
        right = ax.twinx()
        right.set_ylabel("token accuracy")
        for name, (x, y) in accuracy.items():
            label = "eval accuracy" if name is None else f"eval accuracy: {name}"
            right.plot(x, y, "s--", lw=1, ms=3, alpha=0.7, color=color.get(name), label=label)
    labels = []
    for i, r in enumerate(sorted(metrics.resumes, key=lambda r: r["step"])):
        ax.axvline(r["step"], color="tab:red", ls="--", lw=1, label="resume" if i == 0 else None)
        labels.append(
            ax.annotate(
                f"{r.get('backend', '')} x{r.get('world_size', '?')}",
                (r["step"], ax.get_ylim()[1]),
                fontsize=7,
                color="tab:red",
                rotation=90,
                va="top",
                ha="right",
            )
        )
    _unstack(fig, ax, labels)
    loss_at = {r["step"]: r["loss"] for r in steps}
    bad = [r["step"] for r in metrics.failed if r.get("step") in loss_at]
    if bad:
        ax.plot(bad, [loss_at[s] for s in bad], "x", color="tab:orange", ms=8, label="save failed")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(path.parent.name or "run")
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if right is not None:  # one legend for both axes, on the one drawn last (else the accuracy crosses it)
        more = right.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    (right if right is not None else ax).legend(handles, names, fontsize=8, framealpha=0.9)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def _plot_path(out: str | Path | None, default: Path, formats: dict[str, str]) -> Path:
    """Where :func:`plot_run` writes: ``out`` as a file, ``out/loss.png`` where it is a directory, ``default``
    without it. A file without an extension gets .png (matplotlib would add it, and the path said would be wrong);
    one whose extension is no image format matplotlib writes is refused, naming them."""
    if out is None:
        return default
    path = Path(out)
    if path.is_dir():
        return path / "loss.png"
    if not path.suffix:
        return path.with_name(f"{path.name}.png")
    if path.suffix[1:].lower() not in formats:
        raise ValueError(f"--out {out}: {path.suffix} is not an image format; use one of {', '.join(sorted(formats))}")
    return path


def _consecutive(rows: list[dict]) -> list[list[dict]]:
    """``rows`` cut where the step does not follow the one before (one attempt's steps, then the next's)."""
    runs: list[list[dict]] = []
    for row in rows:
        if runs and row["step"] == runs[-1][-1]["step"] + 1:
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs
