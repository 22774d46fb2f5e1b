"""VisionDrop's registry entry (``prunelab.registry``)."""

from prunelab.methods.visiondrop.method import VisionDrop
from prunelab.methods.visiondrop.schedule import share_schedule
from prunelab.registry import MethodEntry


def _tiny(model) -> dict:
    """The tiny language models have 3 layers, where the official boundaries (after layers 7, 15, 23) do not exist:
    stages after layers 0 and 1, so each of the three layers is one segment."""
    return {"llm_layers": (0, 1)}


def _tiny_budget(model, ratio: float) -> dict:
    """Keep ratio ``ratio`` on the tiny models: the budget rule needs the paper's three LLM stages, so a schedule of
    fractions whose three segment sizes (official proportions 48 : 35 : 26) average ``ratio`` of the tokens; 1.0
    keeps every token."""
    return {"schedule": ((1.0, 0.0),) * 3 if ratio >= 1.0 else share_schedule(ratio, stages=2)}


ENTRIES = (
    MethodEntry(
        name="visiondrop", cls=VisionDrop, family="VLM", seams=("vlm",), for_model="for_model",
        paper="Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment (VisionDrop; AAAI 2026, "
              "arXiv 2506.22283)",
        backbones=("transformers LLaVA-1.5", "LLaVA-NeXT", "Qwen2.5-VL"), baselines=("random_prune",),
        tiny=_tiny, tiny_budget=_tiny_budget, full={"budget": 32}, reproduction="visiondrop",
        keep_all={"schedule": ((1.0, 0.0), (1.0, 0.0), (1.0, 0.0))},
        prune={"schedule": ((0.5, 0.25), (0.5, 0.25), (0.5, 0.25))},
        bad=(({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"), ({"budget": "32"}, "budget"),
             ({"schedule": ((1.0, 0.0),)}, "schedule"), ({"schedule": ((0.5, 0.75),) * 3}, "schedule"),
             ({"schedule": ((64, 0), (64, 0), (64, 0))}, "schedule"),
             ({"llm_layers": (0, 5), "schedule": ((1.0, 0.0),) * 3}, "llm_layers"),
             ({"vit_query": "max"}, "vit_query"), ({"llm_score_mask": "both"}, "llm_score_mask"),
             ({"llm_positions": "renumber"}, "llm_positions"),
             ({"contextual_share": 1.0}, "contextual_share"), ({"official_quirks": 1}, "official_quirks")),
        status="LLaVA-1.5, LLaVA-NeXT (per tile), Qwen2.5-VL on the stage engine (encoder stage 0 with contextual "
               "merging, LLM stages scored with the next layer); tiny preset on random tiny VLMs; full preset "
               "(lmms-eval) needs the checkpoints, task data and a GPU",
    ),
)
