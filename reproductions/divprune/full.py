"""``prunelab reproduce divprune --preset full``: the paper's setting, LLaVA through lmms-eval (not implemented yet).

The options below are the real ones the full preset will take: the model (LLaVA-1.5-7B/13B, LLaVA-1.6-7B; card
Sec. 4), lmms-eval task names (the official run script's 11 image tasks), budgets and batch size 1 as the paper
evaluates. The lmms-eval wrapper that would load the model, apply DivPrune through ``prunelab.apply`` and score
the tasks is not written yet, so ``run`` stops with a ``RuntimeError`` that says so instead of producing numbers.
``expected.yaml`` holds the paper's rows it will be compared with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunelab.methods.divprune import DEFAULT_KEEP_RATIO

TASKS = ("coco2017_cap_val", "flickr30k_test", "gqa", "mmbench_en_dev", "mme", "mmmu_val", "nocaps_val",
         "ok_vqa_val2014", "pope", "scienceqa_img", "seedbench")
"""The official run script's image tasks (card Sec. 4), as lmms-eval names them."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llava-hf/llava-1.5-7b-hf", help="hub id or local folder of a LLaVA model")
    parser.add_argument("--revision", default=None, help="hub revision (commit) of the model")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="lmms-eval task names")
    parser.add_argument("--budgets", type=float, nargs="+", default=[DEFAULT_KEEP_RATIO],
                        help="keep ratios (< 1) or token counts (>= 1) per image; paper: r = 0.098")
    parser.add_argument("--methods", nargs="+", default=["dense", "divprune", "random"],
                        choices=["dense", "divprune", "hiprune", "random"])
    parser.add_argument("--limit", type=int, default=None, help="samples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=1, help="lmms-eval batch size (paper: 1)")
    parser.add_argument("--dtype", default="float16", choices=["bfloat16", "float16", "float32"])


def default_out() -> Path:
    return Path("runs/divprune/full")


def run(args: argparse.Namespace, out: Path) -> dict:
    raise RuntimeError("divprune --preset full: the lmms-eval wrapper (load the model, apply DivPrune, score the "
                       f"tasks {args.tasks}) is not implemented yet; run --preset tiny, and see "
                       "reproductions/divprune/expected.yaml for the paper's numbers")
