"""``prunelab reproduce divprune --preset full``: DivPrune at the paper's settings through lmms-eval.

LLaVA-1.5-7B by default (paper Table 1; ``--model`` takes LLaVA-1.5-13B, LLaVA-1.6 / NeXT or Qwen2.5-VL too), the
official run script's 11 image tasks as lmms-eval names them, keep ratio r = 0.098 (the paper's point, ~56 of 576
tokens), with dense and random at the same budget. ``--budgets 64 128 192`` gives our LLaVA-1.5 token budgets.
The shared machinery is :mod:`prunelab.reproductions.vlm_full`; ``expected.yaml`` holds the paper's rows.
"""

from __future__ import annotations

from prunelab.methods.divprune import DEFAULT_KEEP_RATIO
from prunelab.reproductions.vlm_full import full_preset

TASKS = ("coco2017_cap_val", "flickr30k_test", "gqa", "mmbench_en_dev", "mme", "mmmu_val", "nocaps_val",
         "ok_vqa_val2014", "pope", "scienceqa_img", "seedbench")
"""The official run script's image tasks (``run_Divprune.sh``), as lmms-eval names them."""

add_arguments, run, default_out = full_preset(
    "divprune", "DivPrune", default_model="llava-hf/llava-1.5-7b-hf", tasks=TASKS,
    methods=("dense", "divprune", "random_prune"), budgets=lambda model: [DEFAULT_KEEP_RATIO],
    notes="paper setting: keep ratio 0.098 of every image's visual tokens, batch size 1 (official run_Divprune.sh)")
