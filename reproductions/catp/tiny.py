"""``prunelab reproduce catp --preset tiny``: CATP against DivPrune, random and dense, offline on a CPU.

The shared VLM tiny preset (:mod:`prunelab.reproductions.vlm_tiny`) on tiny random LLaVA-1.5, LLaVA-NeXT and
Qwen2.5-VL models, with in-context prompts: by default the batch holds prompts of 3, 1, 2 and 4 images, the last
image of each the query and the ones before it the demonstrations. A keep ratio r is CATP's R = 1 - r (on NeXT of the
whole packed span, as the other methods prune it). Their language models have 3 layers: the attention increase reads
layers 0 and 1, and both LLM stages run after layer 1. ``visual_mean`` is the image tokens averaged over the
language model's layers (CATP keeps ``1 - R/2`` of them before layer 2, ``1 - R`` after); the others prune once,
before layer 0. The models are random, so KL and agreement measure closeness to the dense random model, not task
accuracy; the trained test-bed VLM's accuracy (single-image questions: CATP's stage 1 and its query stage) follows.
"""

from prunelab.reproductions.vlm_tiny import tiny_preset

METHODS = ("catp", "divprune", "random_prune")  # this paper's method first
PROMPTS = (3, 1, 2, 4)  # images per prompt: 2-shot, 0-shot, 1-shot, 3-shot

add_shared, run, default_out = tiny_preset("catp", "CATP", METHODS)


def add_arguments(parser) -> None:
    add_shared(parser)
    parser.set_defaults(prompts=list(PROMPTS))
