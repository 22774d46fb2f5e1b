"""Which heads Zero-TPrune's variance-based head filter (VHF) admits, on the ViT test-bed, and what the filter does
to accuracy.

    python benchmarks/zero_tprune_heads.py [--images 256] [--n-eval 2000]

For each pruning block of the default schedule it takes the dense model's attention on test images, runs WPR per
head as the I-stage does (the block's iteration count, CLS-boosted start), and reports the variance of the mean-1
scores N * s per head (quantiles over images), the share of heads inside the band [0.01, 0.7] and the share of images
where no head is inside (VHF then falls back to every head). It then measures top-1 with and without VHF
(``vhf_band=None``) at the paper's FLOPs point and at 0.45 x dense, as a paired difference on the same images.
"""

from __future__ import annotations

import argparse

import torch

import prunelab
from prunelab.common.schedule import default_prune_blocks
from prunelab.common.vit import AttentionRecorder, vit_layout
from prunelab.methods.zero_tprune import ZeroTPrune, initial_distribution, wpr_scores
from prunelab.methods.zero_tprune.method import PAPER_FLOPS_REDUCTION
from prunelab.reproductions.testbeds import vit
from prunelab.reproductions.testbeds.fashion import load_fashion_mnist, preprocess
from prunelab.reproductions.zero_tprune.evaluate import hits, model_gflops, paired_difference


@torch.inference_mode()
def head_variances(model, x: torch.Tensor, blocks) -> dict[int, torch.Tensor]:
    """{block: [images, heads] variance of N * s}, with s the I-stage's per-head WPR scores on the dense attention."""
    recorder = AttentionRecorder(blocks)
    with prunelab.apply(model.eval(), recorder):
        model(x)
    layout, method, out = vit_layout(model), ZeroTPrune(), {}
    for block in blocks:
        attn = recorder.stats[block].probs.double()
        n = attn.shape[-1]
        s0 = initial_distribution(n, layout.class_positions, attn.shape[0], dtype=attn.dtype)
        s = wpr_scores(attn, s0, method.iterations_at(block, len(model.blocks)))
        out[block] = (s * n).var(dim=-1, unbiased=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="test images for the head statistics")
    p.add_argument("--n-eval", type=int, default=2000, help="test images for the accuracy ablation")
    a = p.parse_args()
    model, _ = vit.load()
    images, labels = load_fashion_mnist("test")
    blocks = default_prune_blocks(len(model.blocks))
    low, high = ZeroTPrune().vhf_band
    print(f"VHF band [{low}, {high}] on Var(N * s); {a.images} test images; dense attention at each pruning block\n")
    print("| block | heads | Var(N*s) per head: min / median / max over images | heads in band | "
          "images with no head in band |")
    print("|---|---|---|---|---|")
    for block, var in head_variances(model, preprocess(images[: a.images]), blocks).items():
        inside = (var >= low) & (var <= high)
        per_head = "; ".join(f"h{h}: {var[:, h].min():.3g} / {var[:, h].median():.3g} / {var[:, h].max():.3g}"
                             for h in range(var.shape[1]))
        print(f"| {block} | {var.shape[1]} | {per_head} | {inside.double().mean():.0%} | "
              f"{(~inside.any(dim=1)).double().mean():.0%} |")

    x, y = preprocess(images[: a.n_eval]), labels[: a.n_eval]
    batches = list(zip(x.split(250), y.split(250)))
    dense_g = model_gflops(model, None)
    print(f"\ntop-1 with and without VHF ({len(y)} test images; paired difference, points)\n")
    print("| GFLOPs fraction | with VHF | without VHF | with - without |")
    print("|---|---|---|---|")
    for fraction in (1 - PAPER_FLOPS_REDUCTION, 0.45):
        g = fraction * dense_g
        on = hits(model, ZeroTPrune(gflops=g), batches, progress=False)
        off = hits(model, ZeroTPrune(gflops=g, vhf_band=None), batches, progress=False)
        d, se = paired_difference(on, off)
        print(f"| {fraction:.3f} | {100 * on.double().mean():.2f} | {100 * off.double().mean():.2f} | "
              f"{d:+.2f} ± {se:.2f} |")


if __name__ == "__main__":
    main()
