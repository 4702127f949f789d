"""``dist-lora plot RUN_DIR``: the loss curve from a run's metrics JSONL, with resume points and failed saves
marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_lora.data import jsonl_rows


def read_metrics(path: Path) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(step rows, resume events, save_failed events, eval events) from a metrics JSONL written by the trainer;
    other events are left out."""
    steps: list[dict] = []
    events: dict[str, list[dict]] = {"resume": [], "save_failed": [], "eval": []}
    for _, row in jsonl_rows(path):
        if "event" in row:
            events.get(str(row["event"]), []).append(row)
        elif "loss" in row:
            steps.append(row)
    return steps, events["resume"], events["save_failed"], events["eval"]


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


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw train (and eval) loss against step to a PNG (default: next to the metrics file); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass a run dir holding metrics.jsonl, or the JSONL itself")
    steps, resumes, failed, evals = read_metrics(path)
    if not steps:
        raise ValueError(f"{path} holds no step rows")
    out_path = Path(out) if out else path.with_name("loss.png")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1.2, label="train loss")
    if evals:
        last = {r["step"]: r["eval_loss"] for r in evals}  # a step evaluated again after a resume: the newest
        ax.plot(sorted(last), [last[s] for s in sorted(last)], "o-", lw=1.2, ms=4, label="eval loss")
    labels = []
    for i, r in enumerate(sorted(resumes, key=lambda r: r["step"])):
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
    bad = [r["step"] for r in failed if r.get("step") in loss_at]
    if bad:
        ax.plot(bad, [loss_at[s] for s in bad], "x", color="tab:orange", ms=8, label="save failed")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(path.parent.name or "run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
