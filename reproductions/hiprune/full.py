"""``prunelab reproduce hiprune --preset full``: HiPrune at the paper's settings through lmms-eval.

LLaVA-1.5-7B by default; ``--model`` takes LLaVA-NeXT-7B or Qwen2.5-VL (the abstract's models; official README).
Without ``--budgets`` the paper's budgets for the model are used (``PAPER_BUDGETS``: 192 / 128 / 64 of 576 on
LLaVA-1.5, 640 / 320 / 160 of 2880 on NeXT, keep ratios 0.334 / 0.223 / 0.112 on Qwen2.5-VL), with dense and random at
the same budgets. The method is ``HiPrune.for_model`` with the paper's blocks; ``--method-args`` overrides its fields
(e.g. ``anchor_ratio=0`` for the registers-only ablation). ``expected.yaml`` holds the paper's claims.
"""

from __future__ import annotations

from prunelab.methods.hiprune import PAPER_BUDGETS
from prunelab.reproductions.vlm_full import budgets_by_model, full_preset

TASKS = ("gqa", "mmbench_en_dev", "mme", "pope", "scienceqa_img", "seedbench", "textvqa_val", "vqav2_val")
"""Image benchmarks as lmms-eval names them; the paper's exact task list is open (the official
bench_*.sh scripts mix lmms-eval and LLaVA's own evaluation)."""


paper_budgets = budgets_by_model(PAPER_BUDGETS)
"""The paper's budgets for a checkpoint name (NeXT / Qwen by name, LLaVA-1.5 otherwise)."""

add_arguments, run, default_out = full_preset(
    "hiprune", "HiPrune", default_model="llava-hf/llava-1.5-7b-hf", tasks=TASKS,
    methods=("dense", "hiprune", "random_prune"), budgets=paper_budgets,
    notes="paper setting: alpha 0.1, object layer 9 (CLIP) / 16 (Qwen2.5-VL), deep layer penultimate / last "
          "(official README, hyperparameter table)")
