"""FlowCut's registry entry (``prunelab.registry``)."""

from prunelab.methods.flowcut.method import FlowCut
from prunelab.registry import MethodEntry

ENTRIES = (
    MethodEntry(
        name="flowcut", cls=FlowCut, family="VLM", seams=("vlm",), for_model="for_model",
        paper="FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models "
              "(NeurIPS 2025)",
        backbones=("transformers LLaVA-1.5", "LLaVA-NeXT", "Qwen2.5-VL"), baselines=("random_prune",),
        full={"budget": 64}, reproduction="flowcut",
        keep_all={"budget": 1.0}, prune={"budget": 0.25},
        bad=(({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"), ({"budget": "64"}, "budget"),
             ({"semantic": "dot"}, "semantic"), ({"ema_weight": 1.5}, "ema_weight"), ({"llm_layer": -1}, "llm_layer"),
             ({"official_quirks": 1}, "official_quirks")),
        status="LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL on the stage engine (encoder stages, NeXT/Qwen LLM cut); tiny "
               "preset on random tiny VLMs; full preset (lmms-eval) needs the checkpoints, task data and a GPU",
    ),
)
