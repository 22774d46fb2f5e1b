"""``prunelab reproduce divprune --preset tiny``: DivPrune against HiPrune, random and dense, offline on a CPU.

The shared VLM tiny preset (:mod:`prunelab.reproductions.vlm_tiny`) on tiny random LLaVA-1.5, LLaVA-NeXT and
Qwen2.5-VL models: prefill MACs, KV bytes, measured latency, and KL / top-1 agreement with the dense model at keep
ratios 0.111 / 0.222 / 0.333 (DivPrune's paper point is r = 0.098). The models are random, so KL and agreement
measure closeness to the dense random model, not task accuracy; the paper's numbers are in ``expected.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunelab.reproductions.vlm_tiny import add_tiny_arguments, run_vlm_tiny

METHODS = ("divprune", "hiprune", "random")  # this paper's method first: the table lists it first


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_tiny_arguments(parser)


def default_out() -> Path:
    return Path("runs/divprune/tiny")


def run(args: argparse.Namespace, out: Path) -> dict:
    return run_vlm_tiny(out, args.methods or METHODS, paper="DivPrune", families=args.families, ratios=args.ratios,
                        prompts=args.prompts, decode_steps=args.decode_steps, warmup=args.warmup,
                        repeat=args.repeat, seed=args.seed)
