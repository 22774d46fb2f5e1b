"""``prunelab reproduce visiondrop --preset full``: VisionDrop at the paper's settings through lmms-eval.

LLaVA-1.5-7B by default; ``--model`` takes LLaVA-NeXT-7B or Qwen2.5-VL. Without ``--budgets`` the budgets of
``PAPER_BUDGETS`` are used: the average visual tokens T = 192 / 128 / 64 / 32 on LLaVA-1.5 (32 is the official
schedule 48 / 35 / 26 / 19; the others follow the budget rule in the method README), T = 128 / 64 / 32 per tile on
LLaVA-NeXT (about 640 / 320 / 160 tokens for five tiles; 320 is the paper's efficiency setting), and keep ratios
0.333 / 0.222 / 0.111 of each image's merge units on Qwen2.5-VL; dense and random at the same budgets. The method is
``VisionDrop.for_model``; ``--method-args`` overrides its fields (e.g. ``official_quirks=true``). ``expected.yaml``
holds the paper's claims.
"""

from __future__ import annotations

from prunelab.methods.visiondrop import PAPER_BUDGETS
from prunelab.reproductions.vlm_full import budgets_by_model, full_preset

TASKS = ("gqa", "mmbench_en_dev", "mme", "pope", "scienceqa_img", "textvqa_val", "vqav2_val")
"""Image benchmarks as lmms-eval names them (the paper's Table 1 set, less MMB-CN and VizWiz)."""

paper_budgets = budgets_by_model(PAPER_BUDGETS)
"""The budgets for a checkpoint name (NeXT / Qwen by name, LLaVA-1.5 otherwise)."""

add_arguments, run, default_out = full_preset(
    "visiondrop", "VisionDrop", default_model="llava-hf/llava-1.5-7b-hf", tasks=TASKS,
    methods=("dense", "visiondrop", "random_prune"), budgets=paper_budgets,
    notes="official settings: stage 0 at the feature layer (42 + 6 at T = 32), LLM stages before layers 8, 16, 24 "
          "scored with those layers' projections, causal image-query score, positions renumbered")
