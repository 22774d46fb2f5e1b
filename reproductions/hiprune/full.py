"""``prunelab reproduce hiprune --preset full``: the paper's setting through lmms-eval (not implemented yet).

The options below are the real ones the full preset will take: the model (LLaVA-1.5-7B, LLaVA-NeXT-7B,
Qwen2.5-VL; card Sec. 3-4), lmms-eval task names, and the paper's budgets per model (``PAPER_BUDGETS``:
192 / 128 / 64 of 576 on LLaVA-1.5, 640 / 320 / 160 on NeXT, keep ratios on Qwen2.5-VL). The lmms-eval wrapper
that would load the model, apply ``HiPrune.for_model`` through ``prunelab.apply`` and score the tasks is not
written yet, so ``run`` stops with a ``RuntimeError`` that says so instead of producing numbers.
``expected.yaml`` holds the paper's claims it will be compared with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TASKS = ("gqa", "mmbench_en_dev", "mme", "pope", "scienceqa_img", "seedbench", "textvqa_val", "vqav2_val")
"""Image benchmarks as lmms-eval names them; the paper's exact task list is open (card Sec. 4)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llava-hf/llava-1.5-7b-hf",
                        help="hub id or local folder (LLaVA-1.5, LLaVA-NeXT or Qwen2.5-VL)")
    parser.add_argument("--revision", default=None, help="hub revision (commit) of the model")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="lmms-eval task names")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="token counts (>= 1) or keep ratios (< 1) per image; default: the paper's for the model")
    parser.add_argument("--anchor-ratio", type=float, default=0.1, help="alpha (paper: 0.1)")
    parser.add_argument("--methods", nargs="+", default=["dense", "hiprune", "random"],
                        choices=["dense", "divprune", "hiprune", "random"])
    parser.add_argument("--limit", type=int, default=None, help="samples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=1, help="lmms-eval batch size")
    parser.add_argument("--dtype", default="float16", choices=["bfloat16", "float16", "float32"])


def default_out() -> Path:
    return Path("runs/hiprune/full")


def run(args: argparse.Namespace, out: Path) -> dict:
    raise RuntimeError("hiprune --preset full: the lmms-eval wrapper (load the model, apply HiPrune.for_model, "
                       f"score the tasks {args.tasks}) is not implemented yet; run --preset tiny, and see "
                       "reproductions/hiprune/expected.yaml for the paper's claims")
