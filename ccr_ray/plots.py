"""PNG plots people would rather look at than logs: training curves, sweep results. No Ray import."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def plot_training_curve(history: Sequence[dict], path: str | Path, title: str = "") -> Path | None:
    """Loss per logged step (left axis) and validation mean mR (right axis)."""
    train = [r for r in history if "loss" in r]
    val = [r for r in history if "val/mR" in r]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
        ax.set_ylabel("loss", color="tab:blue")
        ax.set_yscale("log")
    ax.set_xlabel("step")
    if val:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r["val/mR"] for r in val], "o-", color="tab:red", label="val mR")
        ax2.set_ylabel("validation mean mR", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_language_bars(rows: dict[str, dict[str, float]], languages: Sequence[str], path: str | Path,
                       title: str = "") -> Path:
    """Grouped bars: mR per language for each model/setting (rows: name -> {lang: mR})."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(rows), 1)
    for i, (name, values) in enumerate(rows.items()):
        xs = [j + i * width for j in range(len(languages))]
        ax.bar(xs, [values.get(lang, 0.0) for lang in languages], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(languages))])
    ax.set_xticklabels(languages)
    ax.set_ylabel("mR (test)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_sweep_values(records, space: dict[str, str], path: str | Path, title: str = "") -> Path | None:
    """Best validation mR of every trial against each swept value (one panel per key); early-stopped trials
    hollow, errored ones crossed. `records`: tune.report.TrialRecord."""
    keys = list(space)
    if not records or not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [r.values.get(key) for r in records]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = sorted({str(v) for v in values}, key=lambda c: (len(c), c))
        for r, v in zip(records, values):
            x = v if numeric else categories.index(str(v))
            y = r.best
            if r.status == "stopped early":
                ax.scatter([x], [y], facecolors="none", edgecolors="tab:blue", s=40)
            elif r.status == "error":
                ax.scatter([x], [0.0], marker="x", color="tab:red", s=40)
            else:
                ax.scatter([x], [y], color="tab:blue", s=40)
        if numeric and str(space[key]).startswith("loguniform"):
            ax.set_xscale("log")
        if not numeric or str(space[key]).startswith(("choice", "grid")):
            ticks = sorted({v for v in values}, key=str) if numeric else categories
            ax.set_xticks(ticks if numeric else range(len(categories)))
            ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlabel(key)
        ax.set_ylabel("best val mR")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}  (filled: ran to the end, hollow: stopped early by ASHA)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_sweep_curves(records, path: str | Path, title: str = "") -> Path | None:
    """Validation mR against step for every trial; early-stopped trials dashed and ended with an x."""
    if not records:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in records:
        if not r.curve:
            continue
        steps, values = zip(*r.curve)
        stopped = r.status == "stopped early"
        (line,) = ax.plot(steps, values, "--" if stopped else "-", marker="o", markersize=3,
                          label=f"{r.trial_id}{' (stopped)' if stopped else ''}")
        if stopped:
            ax.plot([steps[-1]], [values[-1]], "x", color=line.get_color(), markersize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("validation mean mR")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
