"""``prunelab reproduce visiondrop --preset tiny``: VisionDrop against FlowCut, DivPrune, HiPrune, random and dense,
offline on a CPU.

The shared VLM tiny preset (:mod:`prunelab.reproductions.vlm_tiny`) on tiny random LLaVA-1.5, LLaVA-NeXT and
Qwen2.5-VL models. Their language models have 3 layers, so VisionDrop's LLM stages run after layers 0 and 1 and a
keep ratio r is a schedule whose three segment sizes (the official proportions 48 : 35 : 26) average r of each
image's tokens (``schedule.share_schedule``); ``visual_mean`` is that average as measured, ``kept_visual`` what the
last layer sees. The other methods prune once, before the language model, at r. The models are random, so KL and
agreement measure closeness to the dense random model, not task accuracy.
"""

from prunelab.reproductions.vlm_tiny import tiny_preset

METHODS = ("visiondrop", "flowcut", "divprune", "hiprune", "random_prune")  # this paper's method first

add_arguments, run, default_out = tiny_preset("visiondrop", "VisionDrop", METHODS)
