"""Plots of DToP's reproductions: the mIoU-GFLOPs curve and the exit stage of every token drawn over a canvas."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from prunelab.reproductions.testbeds.scenes import BACKGROUND, MEAN, STD

STAGE_COLORS = ("#2ca02c", "#ff7f0e", "#d62728")  # exit after stage 1, 2, survived to the last head


def curve(rows: list[dict], title: str):
    """mIoU against GFLOPs: DToP and random exit on both models, the dense points."""
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {("base", "DToP"): ("C0", "o", "-"), ("fine-tuned", "DToP"): ("C1", "o", "-"),
              ("base", "random exit"): ("C0", "x", ":"), ("fine-tuned", "random exit"): ("C1", "x", ":")}
    for (model, method), (color, marker, line) in styles.items():
        pts = sorted((r["gflops"], r["miou"], r["miou_se"]) for r in rows if r["model"] == model
                     and r["method"] == method)
        if pts:
            g, m, se = zip(*pts)
            ax.errorbar(g, m, yerr=se, color=color, marker=marker, linestyle=line, capsize=2,
                        label=f"{method} ({model})")
    for r in rows:
        if r["method"].startswith("dense"):
            ax.plot(r["gflops"], r["miou"], "k*" if r["model"] == "base" else "r*", ms=10,
                    label=f"dense ({r['model']})")
    ax.set_xlabel("GFLOPs per image (mean)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _labels(ax, mask: torch.Tensor, title: str) -> None:
    m = np.ma.masked_equal(mask.numpy(), BACKGROUND)
    ax.imshow(np.zeros(mask.shape), cmap="gray", vmin=0, vmax=1)
    ax.imshow(m, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def show_exits(image: torch.Tensor, target: torch.Tensor, dense: torch.Tensor, pruned: torch.Tensor,
               exit_stage: torch.Tensor, grid: tuple[int, int], title: str = ""):
    """One canvas: the image with each token's exit stage drawn over it, the target, the dense and the DToP
    segmentation (background black).

    Args:
        image: [1, H, W] normalised canvas; target, dense, pruned: [H, W] class maps; exit_stage: [N] per token.
    """
    fig, ax = plt.subplots(1, 4, figsize=(11, 3))
    ax[0].imshow((image[0] * STD + MEAN).numpy(), cmap="gray", vmin=0, vmax=1)
    H, W = image.shape[-2:]
    ph, pw = H / grid[0], W / grid[1]
    for t, s in enumerate(exit_stage.tolist()):
        r, c = divmod(t, grid[1])
        ax[0].add_patch(plt.Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, color=STAGE_COLORS[s], alpha=0.35,
                                      linewidth=0))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.5) for c in STAGE_COLORS]
    ax[0].legend(handles, ["exit after stage 1", "exit after stage 2", "to the last head"], fontsize=6,
                 loc="lower left")
    ax[0].set_title("tokens by exit stage", fontsize=9)
    ax[0].axis("off")
    _labels(ax[1], target, "target")
    _labels(ax[2], dense, "dense")
    _labels(ax[3], pruned, "DToP")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
