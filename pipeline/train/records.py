"""A run's human-readable records: log.csv (one row per step) and curves.png (loss and validation SSIM)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.core.io import atomic_path


def write_log(rows: list[dict], run: Path) -> None:
    with atomic_path(run / "log.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)



def plot_curves(rows: list[dict], bicubic_ssim: float | None, run: Path, title: str) -> None:
    """curves.png: training loss and validation SSIM against step (bicubic as a reference line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = pd.DataFrame(rows)
    # fixed margins, no layout engine: it measured ~0.4 s of text layout per plot
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.85, wspace=0.25)
    train_rows = log[log["loss"].notna()]
    window = len(train_rows) // 50  # a running mean once there are enough steps to smooth
    ax_loss.plot(train_rows["step"], train_rows["loss"], lw=0.6 if window > 1 else 1.2,
                 alpha=0.4 if window > 1 else 1.0, label="per step")
    if window > 1:
        ax_loss.plot(train_rows["step"], train_rows["loss"].rolling(window, min_periods=1).mean(),
                     lw=1.5, label=f"mean of {window} steps")
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_loss.legend()
    val = log[log["val_ssim"].notna()]
    ax_val.plot(val["step"], val["val_ssim"], "o-", label="model (held-out fold)")
    if bicubic_ssim is not None:
        ax_val.axhline(bicubic_ssim, color="grey", ls="--", label=f"bicubic {bicubic_ssim:.4f}")
    ax_val.set(xlabel="step", ylabel="SSIM", title="validation SSIM")
    ax_val.legend()
    fig.suptitle(title)
    with atomic_path(run / "curves.png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
