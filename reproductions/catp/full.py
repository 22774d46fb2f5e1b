"""``prunelab reproduce catp --preset full``: CATP at the paper's settings through lmms-eval, 4-shot.

LLaVA-NeXT-7B by default (``llava-hf/llava-v1.6-vicuna-7b-hf``; ``--model`` takes LLaVA-NeXT-13B, LLaVA-1.5 or
Qwen2.5-VL too), the paper's benchmarks as lmms-eval names them, every question after 4 in-context demonstrations
(image, question, answer) of the same task drawn at random (``--shots``, ``--shot-seed``; the lmms-eval model
``prunelab``'s ``shots``), and R in {66.7, 77.8, 89.9} %, with DivPrune and random tokens at the same share of each
image kept. Budgets are keep ratios: CATP runs with ``ratio = 1 - budget`` (R), the baselines keep ``budget`` of
every image. The shared machinery is :mod:`prunelab.reproductions.vlm_full`; ``expected.yaml`` holds the paper's rows.

What differs from the paper's protocol, which its text does not spell out further:
- demonstrations come from the task's training split when the data lmms-eval loads hold one (the paper draws them
  from the training split); otherwise from the evaluated split without the question itself (``--shot-split`` names
  another split of the task's data);
- a demonstration's answer is the task's target, or the most frequent of a VQA document's human answers;
- HatefulMemes and VL-ICL have no lmms-eval task in the pinned version: give their task YAMLs with
  ``--include-path`` and ``--tasks``.
"""

from __future__ import annotations

from prunelab.methods.catp import PAPER_RATIOS
from prunelab.reproductions.vlm_full import full_preset

TASKS = ("vqav2_val", "vizwiz_vqa_val", "ok_vqa_val2014", "gqa", "mmstar", "mmerealworld")
"""The paper's benchmarks that the pinned lmms-eval names (HatefulMemes and VL-ICL it does not)."""

SHOTS = 4


def budget_args(method: str, budget: int | float) -> dict:
    """CATP's removed share ``ratio = 1 - budget`` of a keep ratio; the baselines' ``budget`` as it is."""
    if method != "catp":
        return {"budget": budget}
    if not isinstance(budget, float):
        raise ValueError(f"budgets: CATP removes a share of all image tokens; give keep ratios (0.222), not token "
                         f"counts ({budget})")
    return {"ratio": round(1.0 - budget, 6)}


add_arguments, run, default_out = full_preset(
    "catp", "CATP", default_model="llava-hf/llava-v1.6-vicuna-7b-hf", tasks=TASKS,
    methods=("dense", "catp", "divprune", "random_prune"),
    budgets=lambda model: [round(1.0 - r, 6) for r in PAPER_RATIOS], budget_args=budget_args, shots=SHOTS,
    notes="paper setting: 4-shot, R in {66.7, 77.8, 89.9} % (budget = 1 - R kept), K = 6 (10 from 40 layers), "
          "lambda_1 = 0.7, lambda_2 = 0.6; LLaVA-NeXT images as the base tile's 576 tokens (next_tokens='base')")
