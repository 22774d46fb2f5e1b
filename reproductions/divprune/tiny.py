"""``prunelab reproduce divprune --preset tiny``: DivPrune against HiPrune, random and dense, offline on a CPU.

The shared VLM tiny preset (:mod:`prunelab.reproductions.vlm_tiny`) on tiny random LLaVA-1.5, LLaVA-NeXT and
Qwen2.5-VL models: prefill MACs, KV bytes, measured latency, and KL / top-1 agreement with the dense model at keep
ratios 0.111 / 0.222 / 0.333 (DivPrune's paper point is r = 0.098). The models are random, so KL and agreement
measure closeness to the dense random model, not task accuracy; the paper's numbers are in ``expected.yaml``.
"""

from prunelab.reproductions.vlm_tiny import tiny_preset

METHODS = ("divprune", "hiprune", "random_prune")  # this paper's method first: the table lists it first

add_arguments, run, default_out = tiny_preset("divprune", "DivPrune", METHODS)
