"""The PNG of a run's curves: training and validation loss, masked accuracy per level."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Union


def plot_curves(records: List[Dict], path: Union[str, Path]) -> Path:
    """Draw the records of metrics.jsonl (train lines carry "loss", validation lines
    "val_loss") into a 2 x 2 PNG at `path` (written atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(title="masked-token cross-entropy", xlabel="step", ylabel="loss (nats)")
    ax.legend()
    for ax, key, source, title in ((axes[0, 1], "acc_level", train, "train accuracy per level"),
                                   (axes[1, 0], "val_acc_level", val,
                                    "validation accuracy per level")):
        if source:
            levels = len(source[0][key])
            for q in range(levels):
                pts = [(r["step"], r[key][q]) for r in source if r[key][q] is not None]
                if pts:
                    ax.plot(*zip(*pts), label=f"level {q + 1}")
            ax.legend(fontsize="small", ncol=2)
        ax.set(title=title, xlabel="step", ylabel="masked-token accuracy", ylim=(0, 1))
    ax = axes[1, 1]
    if train:
        ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(title="learning rate", xlabel="step")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
