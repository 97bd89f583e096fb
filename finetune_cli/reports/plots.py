"""A run's curves from its metrics.jsonl: loss.png at the end of training, the same figure as inline SVG for its
report page, and several runs overlaid for `ftune compare`.

Matplotlib's object API on its Agg (PNG) and SVG canvases, never pyplot: no display or GUI backend is looked for,
and no global figure state is kept (safe in a server or a thread)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from finetune_cli import files, rundir

# eval figures other than the loss, drawn in a panel of their own: classifiers' scores and preference pair metrics
EVAL_SCORES = {"eval_accuracy": "eval accuracy", "eval_macro_f1": "eval macro F1", "eval_margin": "eval margin"}


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows; a torn line (a run killed while writing) or one without a step is skipped."""
    try:
        lines = (Path(run_dir) / rundir.METRICS).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and is_number(row.get("step")):
            rows.append(row)
    return rows


def has_curves(rows: list[dict]) -> bool:
    """Whether the rows hold anything to draw (a run that failed before its first log holds nothing)."""
    return any(_series(rows, key)[0] for key in ("loss", "eval_loss", *EVAL_SCORES))


def loss_figure(rows: list[dict]):
    """Train loss per step and eval loss per eval, the learning rate on a second axis; eval scores (accuracy,
    macro F1, pair margin) in a panel below when the run logged them. Each line's SVG group is named (gid)."""
    from matplotlib.figure import Figure

    scores = {label: _series(rows, key) for key, label in EVAL_SCORES.items()}
    scores = {label: points for label, points in scores.items() if points[0]}
    fig = Figure(figsize=(7, 5.2 if scores else 3.6), layout="constrained")
    axes = fig.subplots(2 if scores else 1, 1, sharex=True, squeeze=False, height_ratios=[3, 2] if scores else None)
    ax = axes[0, 0]
    train, evals, rate = _series(rows, "loss"), _series(rows, "eval_loss"), _series(rows, "learning_rate")
    if train[0]:
        dots = "." if len(train[0]) < 30 else None  # a short run's few points stay visible
        ax.plot(*train, color="C0", linewidth=1.2, marker=dots, label="train loss", gid="train-loss")
    if evals[0]:
        ax.plot(*evals, color="C1", marker="o", markersize=4, label="eval loss", gid="eval-loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if rate[0]:
        twin = ax.twinx()
        twin.plot(*rate, color="0.5", linestyle=":", linewidth=1, label="learning rate", gid="learning-rate")
        twin.set_ylabel("learning rate")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, fontsize="small")
    if scores:
        low, margin = axes[1, 0], scores.pop("eval margin", None)
        for i, (label, points) in enumerate(scores.items()):
            low.plot(*points, color=f"C{i + 2}", marker="o", markersize=4, label=label, gid=label.replace(" ", "-"))
        low.set_ylabel("eval score")
        low.grid(alpha=0.3)
        sides = [low, low.twinx()] if margin and scores else [low]
        if margin:  # log-probability units, not a 0..1 score: an axis of its own beside the scores
            sides[-1].plot(*margin, color="C4", marker="s", markersize=4, label="eval margin", gid="eval-margin")
            sides[-1].set_ylabel("eval margin")
        found = [side.get_legend_handles_labels() for side in sides]
        low.legend([h for f in found for h in f[0]], [t for f in found for t in f[1]], fontsize="small")
    axes[-1, 0].set_xlabel("step")
    return fig


def overlay_figure(curves: list[dict]):
    """Several runs' train loss (lines) and eval loss (dashed, with markers) on one plot, one color per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for i, curve in enumerate(curves):
        name, rows, color = _text(str(curve["name"])), curve.get("rows") or [], f"C{i % 10}"
        train, evals = _series(rows, "loss"), _series(rows, "eval_loss")
        if train[0]:
            ax.plot(*train, color=color, linewidth=1.2, label=f"{name} train", gid=f"run{i}-train")
        if evals[0]:
            style = {"linestyle": "--", "marker": "o", "markersize": 4}
            ax.plot(*evals, color=color, label=f"{name} eval", gid=f"run{i}-eval", **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return fig


def svg(rows: list[dict]) -> str:
    """loss_figure as inline SVG text (an <svg> element, no XML prolog)."""
    return _svg(loss_figure(rows))


def overlay_svg(curves: list[dict]) -> str:
    """overlay_figure of [{"name", "rows"}] as inline SVG text."""
    return _svg(overlay_figure(curves))


def write_loss_png(run_dir: Path) -> str | None:
    """loss.png in the run folder from its metrics.jsonl; returns the same figure as SVG text for the report page
    (drawn once for both: this runs at the end of every training), or None when there is nothing to draw."""
    rows = read_metrics(run_dir)
    if not has_curves(rows):
        return None
    figure, data = loss_figure(rows), io.BytesIO()
    figure.savefig(data, format="png", dpi=100)
    files.write_bytes(Path(run_dir) / rundir.LOSS_PLOT, data.getvalue())
    return _svg(figure)


def _svg(fig) -> str:
    import matplotlib

    out = io.BytesIO()
    # text stays text (small, selectable; matplotlib escapes it as XML); ids the same from one page to the next
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "ftune"}):
        fig.savefig(out, format="svg", metadata={"Date": None})
    text = out.getvalue().decode("utf-8")
    return text[text.index("<svg") :]


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if is_number(r.get(key)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(name: str) -> str:
    """A run's name as a legend label, shown as typed: `$` is not math, and a leading `_` does not hide it."""
    name = name.replace("$", r"\$")
    return "\u200b" + name if name.startswith("_") else name
