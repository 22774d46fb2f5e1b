"""Figures for the Zero-TPrune reproduction: the budget curve, WPR scores and kept tokens on an image."""

from __future__ import annotations

import matplotlib.pyplot as plt  # headless machines fall back to Agg; notebooks keep their inline backend
import torch

import prunelab
from prunelab.common.vit import AttentionRecorder, vit_layout
from prunelab.methods.zero_tprune import ZeroTPrune, aggregate_heads, initial_distribution, wpr_scores

STYLE = {"Zero-TPrune": ("tab:blue", "o"), "random drop": ("tab:gray", "s"),
         "Zero-TPrune, 1 iteration": ("tab:orange", "^"), "CLS attention": ("tab:green", "v"),
         "dense": ("black", "*")}


def budget_curve(rows: list[dict], title: str = "Top-1 against GFLOPs"):
    """Top-1 (with binomial standard-error bars) against analytic GFLOPs, one line per method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == name), key=lambda r: r["gflops"])
        color, marker = STYLE.get(name, (None, "o"))
        ax.errorbar([r["gflops"] for r in pts], [r["top1"] for r in pts], yerr=[r["top1_se"] for r in pts],
                    label=name, color=color, marker=marker, ms=7 if name == "dense" else 5, capsize=2)
    ax.set_xlabel("GFLOPs per image (analytic, MACs)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


@torch.inference_mode()
def wpr_map(model, image: torch.Tensor, block: int, method: ZeroTPrune | None = None) -> torch.Tensor:
    """``method``'s aggregated WPR importance of each patch at ``block`` of the dense model -> [rows, cols].

    Uses the method's (default: ``ZeroTPrune()``) iteration count for that block, start vector and VHF band.
    """
    method = method or ZeroTPrune()
    layout = vit_layout(model)
    recorder = AttentionRecorder([block])
    with prunelab.apply(model, recorder):
        model(image[None])
    probs = recorder.stats[block].probs
    s0 = initial_distribution(probs.shape[-1], layout.class_positions, 1, cls_boost=method.cls_boost,
                              device=probs.device)
    iters = method.iterations_at(block, len(model.blocks))
    score = aggregate_heads(wpr_scores(probs, s0, iters), method.vhf_band)[0, layout.num_prefix:]
    return score.reshape(layout.grid).cpu()


def kept_masks(kept: list[tuple[int, torch.Tensor]], layout, sample: int = 0) -> list[tuple[int, torch.Tensor]]:
    """For each pruning block, a [rows, cols] bool mask of the patches still present after it."""
    masks = []
    for block, ids in kept:
        patches = ids[sample][ids[sample] >= layout.num_prefix] - layout.num_prefix
        mask = torch.zeros(layout.num_patches, dtype=torch.bool)
        mask[patches.cpu()] = True
        masks.append((block, mask.reshape(layout.grid)))
    return masks


def show_pruning(image: torch.Tensor, score: torch.Tensor, masks, title: str = ""):
    """The image, its WPR scores, and the patches kept after each pruning block (pruned ones tinted red)."""
    img = image.float().cpu()
    img = img.permute(1, 2, 0) if img.dim() == 3 else img
    img = (img - img.min()) / (img.max() - img.min() + 1e-8)
    cmap = "gray" if img.dim() == 2 or img.shape[-1] == 1 else None
    img = img.squeeze(-1) if img.dim() == 3 and img.shape[-1] == 1 else img
    fig, axes = plt.subplots(1, 2 + len(masks), figsize=(2.6 * (2 + len(masks)), 3.0))
    axes[0].imshow(img, cmap=cmap)
    axes[0].set_title(f"{title}\ninput" if title else "input", fontsize=9)
    axes[1].imshow(score, cmap="viridis")
    axes[1].set_title("WPR score")
    h, w = img.shape[:2]
    for ax, (block, mask) in zip(axes[2:], masks):
        ax.imshow(img, cmap=cmap)
        pruned = torch.nn.functional.interpolate((~mask).float()[None, None], size=(h, w), mode="nearest")[0, 0]
        tint = torch.zeros(h, w, 4)
        tint[..., 0], tint[..., 3] = 1.0, 0.55 * pruned  # red, only where a patch was pruned
        ax.imshow(tint.numpy())
        ax.set_title(f"after block {block + 1}: {int(mask.sum())} kept")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout(pad=1.5)
    return fig
