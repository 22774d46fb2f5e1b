"""How far fixed WPR iteration counts are from the stationary distribution, on the ViT test-bed.

    python benchmarks/zero_tprune_convergence.py [--images 64]

For each pruning block of the default schedule, takes the dense model's attention probabilities on test
images and reports the L1 distance between WPR after k iterations and after 1000 (the limit), averaged over
images and heads, next to the distance of the start vector itself.
"""

from __future__ import annotations

import argparse

import torch

import prunelab
from prunelab.common.schedule import default_prune_blocks
from prunelab.common.vit import AttentionRecorder, vit_layout
from prunelab.methods.zero_tprune import initial_distribution, wpr_scores
from prunelab.reproductions.testbeds import vit
from prunelab.reproductions.testbeds.fashion import load_fashion_mnist, preprocess


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    a = p.parse_args()
    model, _ = vit.load()
    images, _ = load_fashion_mnist("test")
    blocks = default_prune_blocks(len(model.blocks))
    recorder = AttentionRecorder(blocks)
    with prunelab.apply(model.eval(), recorder):
        model(preprocess(images[: a.images]))
    layout = vit_layout(model)
    print("| block | k=0 (start) | k=1 | k=5 | k=10 | k=30 | k=50 |")
    print("|---|---|---|---|---|---|---|")
    for block in blocks:
        attn = recorder.stats[block].probs.double()
        s0 = initial_distribution(attn.shape[-1], layout.class_positions, attn.shape[0], dtype=attn.dtype)
        limit = wpr_scores(attn, s0, 1000)
        dist = [(s0[:, None] - limit).abs().sum(-1).mean().item()]
        dist += [(wpr_scores(attn, s0, k) - limit).abs().sum(-1).mean().item() for k in (1, 5, 10, 30, 50)]
        print(f"| {block + 1} | " + " | ".join(f"{d:.2e}" for d in dist) + " |")


if __name__ == "__main__":
    main()
