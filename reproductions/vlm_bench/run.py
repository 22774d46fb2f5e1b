"""``prunelab reproduce vlm_bench``: the VLM leaderboard on the trained test-bed (one preset, ``tiny``: CPU)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prunelab.cli import NON_NEGATIVE, POSITIVE, RATIO
from prunelab.reproductions.vlm_bench.bench import BUDGETS, COMPOSE, LATE, METHODS, TESTBEDS, run_bench


def add_arguments(parser: argparse.ArgumentParser, preset: str) -> None:
    parser.add_argument("--testbed", choices=list(TESTBEDS), default="llava",
                        help="the trained test-bed: LLaVA (144 CLIP tokens an image) or Qwen2.5-VL (36 merged tokens, "
                             "M-RoPE), same composites and questions")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--compose", nargs="*", default=list(COMPOSE), choices=METHODS,
                        help=f"methods that also get a composition row, then random_prune{LATE} (with random + the "
                             "same late drop as their baseline); none without arguments")
    parser.add_argument("--official", nargs="*", default=[], choices=METHODS,
                        help="methods that also get rows with official_quirks=True (the official code's choices)")
    parser.add_argument("--budgets", type=RATIO, nargs="+", default=list(BUDGETS),
                        help="keep ratios of each image's visual tokens, in (0, 1]")
    parser.add_argument("--n", type=POSITIVE, default=1000, help="held-out questions (the kinds drawn uniformly)")
    parser.add_argument("--templates", choices=["train", "heldout"], default="train",
                        help="question phrasings: those seen in training, or the held-out ones")
    parser.add_argument("--batch-size", type=POSITIVE, default=64)
    parser.add_argument("--speed-batch", type=POSITIVE, default=8, help="questions in the timed batch")
    parser.add_argument("--rounds", type=POSITIVE, default=7, help="interleaved timing rounds")
    parser.add_argument("--seed", type=NON_NEGATIVE, default=0, help="held-out draw and random-baseline seed")
    parser.add_argument("--speed", action="store_true",
                        help="also time every method on a LLaVA-1.5-shaped model (CLIP-L/336 + SmolLM2-135M; about "
                             "4 s a forward on 2 cores, so minutes)")
    parser.add_argument("--speed-rounds", type=POSITIVE, default=5, help="interleaved rounds of the speed table")
    parser.add_argument("--weights", default=None, help="test-bed weights (default: the shipped file)")


def main(args: argparse.Namespace) -> dict:
    if args.preset != "tiny":
        raise SystemExit("vlm_bench has one preset, 'tiny' (the trained test-bed VLM); the full-size VLM presets are "
                         "each paper's `prunelab reproduce <paper> --preset full`")
    out = Path(args.out) if args.out else Path("runs/vlm_bench/tiny" + ("" if args.testbed == "llava" else
                                                                        f"_{args.testbed}"))
    return run_bench(out, args.methods, budgets=args.budgets, n=args.n, templates=args.templates,
                     batch_size=args.batch_size, speed_batch=args.speed_batch, rounds=args.rounds, seed=args.seed,
                     weights=args.weights, speed=args.speed, speed_rounds=args.speed_rounds,
                     compose=args.compose, official=args.official, testbed=args.testbed)
