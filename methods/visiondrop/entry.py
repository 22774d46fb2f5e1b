"""VisionDrop's registry entry (``prunelab.registry``)."""

from prunelab.methods.visiondrop.method import VisionDrop
from prunelab.registry import MethodEntry


def _tiny(model) -> dict:
    """The tiny language models have 3 layers, where the official boundaries (after layers 7, 15, 23) do not exist:
    stages after layers 0 and 1. The budget rule needs the paper's three LLM stages, so the tiny settings below
    give explicit schedules (fractions of the tokens each stage receives: images of any size)."""
    return {"llm_layers": (0, 1)}


ENTRIES = (
    MethodEntry(
        name="visiondrop", cls=VisionDrop, family="VLM", seams=("vlm",), for_model="for_model",
        paper="Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment (VisionDrop; AAAI 2026, "
              "arXiv 2506.22283)",
        backbones=("transformers LLaVA-1.5", "LLaVA-NeXT", "Qwen2.5-VL"), baselines=("random_prune",),
        tiny=_tiny, full={"budget": 32},
        keep_all={"schedule": ((1.0, 0.0), (1.0, 0.0), (1.0, 0.0))},
        prune={"schedule": ((0.5, 0.25), (0.5, 0.25), (0.5, 0.25))},
        bad=(({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"), ({"budget": "32"}, "budget"),
             ({"schedule": ((1.0, 0.0),)}, "schedule"), ({"schedule": ((0.5, 0.75),) * 3}, "schedule"),
             ({"schedule": ((64, 0), (64, 0), (64, 0))}, "schedule"),
             ({"llm_layers": (0, 5), "schedule": ((1.0, 0.0),) * 3}, "llm_layers"),
             ({"vit_query": "max"}, "vit_query"), ({"llm_score_mask": "bidirectional"}, "llm_score_mask"),
             ({"contextual_share": 1.0}, "contextual_share"), ({"official_quirks": 1}, "official_quirks")),
        status="LLaVA-1.5, LLaVA-NeXT (per tile), Qwen2.5-VL on the stage engine (encoder stage 0 with contextual "
               "merging, LLM stages); no presets, notebook or RESULTS.md yet",
    ),
)
