"""DivPrune's registry entry (``prunelab.registry``)."""

from prunelab.methods.divprune.method import DEFAULT_KEEP_RATIO, DivPrune
from prunelab.registry import MethodEntry

ENTRIES = (
    MethodEntry(
        name="divprune", cls=DivPrune, family="VLM", seams=("vlm",),
        paper="DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (CVPR 2025)",
        backbones=("transformers LLaVA-1.5", "LLaVA-NeXT", "Qwen2.5-VL"), baselines=("random_prune",),
        full={"budget": DEFAULT_KEEP_RATIO}, reproduction="divprune",
        keep_all={"budget": 1.0}, prune={"budget": 0.25},
        bad=(({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"), ({"budget": "64"}, "budget"),
             ({"rounding": "up"}, "rounding"), ({"official_quirks": 1}, "official_quirks"), ({"impl": "cuda"}, "impl")),
        status="LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL; tiny preset on random tiny VLMs; full preset (lmms-eval) "
               "needs the checkpoints, task data and a GPU",
    ),
)
