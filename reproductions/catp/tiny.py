"""``prunelab reproduce catp --preset tiny``: CATP against DivPrune, random and dense, offline on a CPU.

1. The in-context test-bed (``testbed.py``, ``icl.{json,md,png}``): a tiny LLaVA trained here whose answer comes
   only from its demonstrations; accuracy at 0, 2, 4 and 8 shots dense, then CATP, DivPrune and random at the paper's
   R, and the last two at CATP's average share of image tokens (equal compute).
2. The shared VLM tiny preset (:mod:`prunelab.reproductions.vlm_tiny`) on tiny random LLaVA-1.5, LLaVA-NeXT and
   Qwen2.5-VL models, with in-context prompts: by default the batch holds prompts of 3, 1, 2 and 4 images, the last
   image of each the query. A keep ratio r is CATP's R = 1 - r (on NeXT of the whole packed span, as the other methods
   prune it). Their language models have 3 layers: the attention increase reads layers 0 and 1, and both LLM stages
   run after layer 1. The models are random, so KL and agreement measure closeness to the dense random model, not
   task accuracy; the trained test-bed VLM's accuracy on single-image questions follows (``testbed.{json,md}``).
"""

from prunelab.cli import NON_NEGATIVE, POSITIVE
from prunelab.reproductions.catp.testbed import SHOTS, icl_table
from prunelab.reproductions.vlm_tiny import tiny_preset

METHODS = ("catp", "divprune", "random_prune")  # this paper's method first
PROMPTS = (3, 1, 2, 4)  # images per prompt: 2-shot, 0-shot, 1-shot, 3-shot

add_shared, run_shared, default_out = tiny_preset("catp", "CATP", METHODS)


def add_arguments(parser) -> None:
    add_shared(parser)
    parser.set_defaults(prompts=list(PROMPTS))
    parser.add_argument("--icl-n", type=NON_NEGATIVE, default=200,
                        help="held-out prompts per shot count on the in-context test-bed (0: skip it)")
    parser.add_argument("--icl-shots", type=POSITIVE, nargs="+", default=[s for s in SHOTS if s],
                        help="shot counts of the in-context table (0 shots, dense only, is always added)")


def run(args, out) -> dict:
    result = {}
    if args.icl_n:
        result["icl"] = icl_table(out, shots=[0, *args.icl_shots], n=args.icl_n, seed=args.seed)
    result.update(run_shared(args, out))
    return result
