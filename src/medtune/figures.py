"""The report's figures, drawn with matplotlib's object-oriented API on the Agg canvas.

Each function takes plain data (what a run dir holds) and returns a `matplotlib.figure.Figure`; `png()` renders one
to bytes. No pyplot: it keeps global state (current figure, open figures) that leaks between calls and threads, and
would pick a GUI backend on a desktop.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

BASE, TUNED, GOLD = "#8c8c8c", "#1f77b4", "#2ca02c"
WIDTH = 7.5


def png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)  # attaches itself: Agg explicitly, whatever the default backend is
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def training_curves(rows: list[dict]) -> Figure:
    """Loss and learning rate per optimizer step (metrics.jsonl), and the validation accuracy beside the loss when
    the run validated during training (train.eval_every)."""
    validated = [r for r in rows if r.get("val_accuracy") is not None]
    fig = Figure(figsize=(WIDTH * (1.4 if validated else 1), 2.8), layout="constrained")
    loss_ax, *val_ax, lr_ax = fig.subplots(1, 3 if validated else 2)
    if validated:
        validation_curve(val_ax[0], validated)
    steps = [r["step"] for r in rows]
    loss_ax.plot(steps, [r["loss"] for r in rows], color=TUNED, marker="." if len(rows) < 50 else None)
    loss_ax.set(title="training loss (target tokens)", xlabel="optimizer step", ylabel="loss")
    lr_ax.plot(steps, [r["lr"] for r in rows], color="#ff7f0e")
    lr_ax.set(title="learning rate", xlabel="optimizer step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (loss_ax, lr_ax):
        ax.grid(alpha=0.3)
    return fig


def validation_curve(ax, rows: list[dict]) -> None:
    """Validation accuracy with its Wilson 95% band per validated step; the best step (the one train.keep=best
    keeps: the earliest of the highest) marked."""
    steps, acc = [r["step"] for r in rows], [r["val_accuracy"] for r in rows]
    ax.fill_between(steps, [r["val_ci95"][0] for r in rows], [r["val_ci95"][1] for r in rows], color=TUNED,
                    alpha=0.15, linewidth=0)
    ax.plot(steps, acc, color=TUNED, marker="o", markersize=3)
    best = max(range(len(rows)), key=lambda i: (acc[i], -steps[i]))
    ax.plot([steps[best]], [acc[best]], marker="*", markersize=11, color=GOLD, linestyle="none",
            label=f"best: step {steps[best]}")
    ax.set(title=f"validation accuracy (n = {rows[0]['val_n']})", xlabel="optimizer step", ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)


def accuracy_bars(groups: list[dict]) -> Figure:
    """Before/after accuracy with 95% CI bars. groups: {label, base, tuned, base_ci, tuned_ci, baseline?}."""
    fig = Figure(figsize=(WIDTH, 0.9 + 0.55 * len(groups)), layout="constrained")
    ax = fig.subplots()
    for i, g in enumerate(groups):
        for offset, key, color in ((-0.18, "base", BASE), (0.18, "tuned", TUNED)):  # base on top
            value, (lo, hi) = g[key], g[f"{key}_ci"]
            ax.barh(i + offset, value, height=0.34, color=color, xerr=[[value - lo], [hi - value]], capsize=3,
                    label=key if i == 0 else None)
            ax.text(min(hi + 0.01, 0.93), i + offset, f"{value:.3f}", va="center", fontsize=8)
        if g.get("baseline") is not None:
            ax.vlines(g["baseline"], i - 0.4, i + 0.4, colors="#d62728", linestyles="dashed",
                      label="majority-letter baseline" if i == 0 else None)
    ax.set_yticks(range(len(groups)), [g["label"] for g in groups])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="accuracy (bars: Wilson 95% CI)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # outside: never over a bar
    ax.grid(axis="x", alpha=0.3)
    return fig


def reliability(tables: dict[str, list[dict]]) -> Figure:
    """Reliability diagram: accuracy against mean confidence per confidence bin, one line per model."""
    fig = Figure(figsize=(WIDTH / 2, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="black", linestyle=":", label="perfect calibration")
    for (label, table), color in zip(tables.items(), (BASE, TUNED)):
        rows = [r for r in table if r["n"]]
        ax.plot([r["mean_confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", color=color,
                label=label)
        for r in rows:
            ax.annotate(str(r["n"]), (r["mean_confidence"], r["accuracy"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points", color=color)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (top option probability)", ylabel="accuracy",
           title="reliability (numbers: items per bin)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def risk_coverage(curves: dict[str, tuple[list[float], list[float]]]) -> Figure:
    """Error rate among the answered questions when only the most confident share is answered."""
    fig = Figure(figsize=(WIDTH / 2, 3.4), layout="constrained")
    ax = fig.subplots()
    for (label, (coverage, risk)), color in zip(curves.items(), (BASE, TUNED)):
        ax.plot(coverage, risk, color=color, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="coverage (share answered, most confident first)",
           ylabel="risk (error rate)", title="risk-coverage")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def letter_distributions(gold: dict[str, float], preds: dict[str, dict[str, float]]) -> Figure:
    """Share of each letter among the gold answers and among each model's predictions."""
    letters = sorted(set(gold) | {k for p in preds.values() for k in p})
    series = {"gold": (gold, GOLD), **{k: (v, c) for (k, v), c in zip(preds.items(), (BASE, TUNED))}}
    fig = Figure(figsize=(WIDTH / 2, 3.0), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(series)
    for j, (label, (dist, color)) in enumerate(series.items()):
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(letters))],
               [dist.get(ch, 0.0) for ch in letters], width=width, color=color, label=label)
    ax.set_xticks(range(len(letters)), letters)
    ax.set(ylabel="share of questions", title="answer letters: gold vs predicted")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def cost_bars(parts: dict[str, float]) -> Figure:
    """Wall time per job of the run (training, each eval)."""
    fig = Figure(figsize=(WIDTH / 2, 0.8 + 0.35 * len(parts)), layout="constrained")
    ax = fig.subplots()
    ax.barh(list(parts), list(parts.values()), color=TUNED)
    ax.invert_yaxis()
    ax.set(xlabel="wall time (s)", title="where the time went")
    ax.grid(axis="x", alpha=0.3)
    return fig
