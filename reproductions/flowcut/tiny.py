"""``prunelab reproduce flowcut --preset tiny``: FlowCut against DivPrune, HiPrune, random and dense, offline on a CPU.

The shared VLM tiny preset (:mod:`prunelab.reproductions.vlm_tiny`) on tiny random LLaVA-1.5, LLaVA-NeXT and
Qwen2.5-VL models: prefill MACs (FlowCut's LLM cut after layer 1 on NeXT and Qwen2.5-VL counted per layer), KV
bytes, measured latency, and KL / top-1 agreement with the dense model at keep ratios 0.111 / 0.222 / 0.333. The
models are random, so KL and agreement measure closeness to the dense random model, not task accuracy; the tiny
towers have 3-4 layers, so FlowCut's schedule has one or three encoder stages there.
"""

from prunelab.reproductions.vlm_tiny import tiny_preset

METHODS = ("flowcut", "divprune", "hiprune", "random_prune")  # this paper's method first: the table lists it first

add_arguments, run, default_out = tiny_preset("flowcut", "FlowCut", METHODS)
