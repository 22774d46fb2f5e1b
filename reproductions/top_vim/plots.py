"""Plots of ToP-ViM's reproductions: the zero-shot budget curve, importance maps, a survivor's scan neighbourhood."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

STYLES = {"ToP-ViM": ("C0", "o", "-"), "ToP-ViM gapped": ("C2", "^", "-"),
          "naive removal (ToP scores)": ("C3", "s", "-"),
          "random, aligned": ("C0", "x", ":"), "random, removed": ("C3", "x", ":")}


def curve_plot(curve: list[dict], table: list[dict], title: str):
    """Top-1 against GFLOPs: ToP-ViM and naive removal with their random twins (zero-shot), dense, and the
    fine-tuned models at the official point."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, (color, marker, line) in STYLES.items():
        pts = sorted((r["gflops"], r["top1"], r["top1_se"]) for r in curve if r["method"] == name)
        if pts:
            g, t, se = zip(*pts)
            ax.errorbar(g, t, yerr=se, color=color, marker=marker, linestyle=line, capsize=2, label=name)
    dense = next(r for r in curve if r["method"] == "dense")
    ax.plot(dense["gflops"], dense["top1"], "k*", ms=11, label="dense")
    for r in table:
        if r["model"].startswith("ft_") and r["method"] in STYLES:
            color = STYLES[r["method"]][0]
            ax.plot(r["gflops"], r["top1"], marker="D", color=color, ms=7, mfc="none", linestyle="none",
                    label=f"{r['method']}, fine-tuned")
    ax.set_xlabel("GFLOPs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def importance_grid(importance: torch.Tensor, grid: tuple[int, int], cls_index: int) -> torch.Tensor:
    """[H, W] map of one image's importance over the patch tokens (the middle CLS's entry dropped)."""
    patches = torch.cat([importance[:cls_index], importance[cls_index + 1:]])
    return patches.reshape(grid)


def show_maps(image: torch.Tensor, maps: dict[str, torch.Tensor], title: str = ""):
    """The image beside importance maps (NaN: tokens pruned earlier, drawn blank)."""
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.3 * (len(maps) + 1), 2.5))
    axes[0].imshow(image.squeeze(0), cmap="gray")
    axes[0].set_title("image", fontsize=8)
    for ax, (name, m) in zip(axes[1:], maps.items()):
        ax.imshow(m, cmap="viridis")
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
