"""``prunelab reproduce flowcut --preset full``: FlowCut at the paper's settings through lmms-eval.

LLaVA-1.5-7B by default; ``--model`` takes LLaVA-NeXT-7B or Qwen2.5-VL. Without ``--budgets`` the official budgets
for the model are used (``PAPER_BUDGETS``: 192 / 128 / 64 on LLaVA-1.5, 640 / 320 / 160 on NeXT, keep ratios
0.333 / 0.222 / 0.111 on Qwen), with dense and random at the same budgets. The method is ``FlowCut.for_model``;
``--method-args`` overrides its fields (e.g. ``official_quirks=true``). ``expected.yaml`` holds the paper's claims.
"""

from __future__ import annotations

from prunelab.methods.flowcut import PAPER_BUDGETS
from prunelab.reproductions.vlm_full import budgets_by_model, full_preset

TASKS = ("gqa", "mmbench_en_dev", "mme", "pope", "scienceqa_img", "textvqa_val", "vqav2_val")
"""Image benchmarks as lmms-eval names them (the official README evaluates with lmms-eval and LLaVA's scripts)."""


paper_budgets = budgets_by_model(PAPER_BUDGETS)
"""The paper's budgets for a checkpoint name (NeXT / Qwen by name, LLaVA-1.5 otherwise)."""

add_arguments, run, default_out = full_preset(
    "flowcut", "FlowCut", default_model="llava-hf/llava-1.5-7b-hf", tasks=TASKS,
    methods=("dense", "flowcut", "random_prune"), budgets=paper_budgets,
    notes="official settings: EMA 0.5, prune at even remaining-layer counters up to the feature layer, NeXT/Qwen "
          "cut after LLM layer 1 (official code)")
