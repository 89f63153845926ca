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
