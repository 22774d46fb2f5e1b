"""DToP's wall-clock against the dense segmenter and against the FLOPs bound, at a real segmenter's shape.

    python benchmarks/dtop_speed.py [--model vit_b] [--batch 8] [--rounds 5] [--device cpu|cuda]

Random weights (timing does not depend on them), so the exits are set rather than graded: half of the batch exits
like the test-bed's easy canvases and half like its hard ones, at the shares per stage that the fine-tuned test-bed
measured at p0 = 0.9 (``--easy`` / ``--hard``, percent of all tokens after stage 1 and 2). The exits go through the
same seam as DToP (``prunelab.apply``), with each image's tokens drawn at random. Dense and pruned forwards are timed
interleaved. Two bounds: ``bound`` = dense MACs / the pruned images' own MACs (what a variable-length kernel could
reach), ``padded_bound`` = dense MACs / the MACs of the padded batch that the key-padding path computes.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch

import prunelab
from prunelab.common.timing import interleave, ratio_summary
from prunelab.reproductions.dtop.full import build

# Exit shares (% of all tokens) after stage 1 and stage 2 on the test-bed's canvases, fine-tuned model, p0 = 0.9
# (reproductions/dtop/RESULTS.md, 2000 test canvases).
EASY, HARD = (70.9, 1.0), (67.5, 0.9)


@dataclass(frozen=True)
class SetExits:
    """Exits at given shares per image (first half of the batch ``easy``, second half ``hard``); random tokens."""

    easy: tuple[float, float]
    hard: tuple[float, float]
    freeze: str = "mask_logit"

    def probabilities(self, head, out):
        return out.tokens

    def exits(self, stage, probs, active):
        out = torch.zeros_like(active)
        g = torch.Generator().manual_seed(stage)
        for b in range(active.shape[0]):
            shares = self.easy if b < active.shape[0] // 2 else self.hard
            idx = active[b].nonzero().squeeze(1)
            left = 1.0 - sum(shares[:stage]) / 100  # shares are of all tokens; this stage sees what is left
            k = round(len(idx) * (shares[stage] / 100) / left) if left > 0 else 0
            out[b, idx[torch.randperm(len(idx), generator=g)[:k].to(idx.device)]] = True
        return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("vit_b", "vit_l", "smoke"), default="vit_b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--easy", type=float, nargs=2, default=EASY)
    p.add_argument("--hard", type=float, nargs=2, default=HARD)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = build(args.model).eval().to(args.device, dtype)
    crop = model.img_size[0]
    x = torch.randn(args.batch, 3, crop, crop, device=args.device, dtype=dtype)
    method = SetExits(tuple(args.easy), tuple(args.hard))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def run():
        model(x)
        sync()

    with torch.no_grad(), prunelab.apply(model, method) as h:
        model(x)
    per_block, per_head = h.state.tokens_per_block, h.state.tokens_per_head
    dense = model.dense_macs() * args.batch
    pruned = float(h.state.macs(model).sum())
    dims = model.dims
    padded = model.macs(per_block.max(0).values.tolist(), per_head.max(0).values.tolist()) * args.batch
    dense_s, times = interleave(model, {"exits": method}, run, rounds=args.rounds, warmup=1)
    speedup, iqr = ratio_summary(dense_s, times["exits"])
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.model} {crop}x{crop}, batch {args.batch} ({args.batch // 2} easy, {args.batch - args.batch // 2} "
          f"hard), {args.dtype}, {name}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    print(f"tokens entering the last block per image: {per_block[:, -1].tolist()} of {dims.num_patches}")
    print(f"dense {1e3 * statistics.median(dense_s):.1f} ms, exits {1e3 * statistics.median(times['exits']):.1f} ms: "
          f"speed-up {speedup:.3f} (IQR {iqr:.3f})")
    bound, padded_bound = dense / pruned, dense / padded
    print(f"bound {bound:.3f} (of it: {(speedup - 1) / (bound - 1):.2f}); padded bound {padded_bound:.3f} (of it: "
          f"{(speedup - 1) / (padded_bound - 1):.2f})")


if __name__ == "__main__":
    main()
