"""LVLM_CSP's registry entry (``prunelab.registry``)."""

from prunelab.methods.lvlm_csp.method import LVLMCSP
from prunelab.registry import MethodEntry


def _tiny(model) -> dict:
    """The tiny language models have 3 layers: clustering in layer 0, every token again in layer 1, pruned before
    layer 2; the prompt's last token stands in for [SEG]."""
    return {"scatter_layer": 1, "prune_layer": 2}


ENTRIES = (
    MethodEntry(
        name="lvlm_csp", cls=LVLMCSP, family="VLM", seams=("vlm",), for_model="for_model",
        paper="LVLM_CSP: Accelerating Large Vision Language Models via Clustering, Scattering, and Pruning for "
              "Reasoning Segmentation (arXiv 2504.10854)",
        backbones=("transformers LLaVA-1.5", "LLaVA-NeXT", "Qwen2.5-VL"), baselines=("random_prune",),
        tiny=_tiny, reproduction="lvlm_csp", keep_all={"clusters": 1.0, "keep": 1.0},
        prune={"clusters": 0.5, "keep": 0.25},
        bad=(({"clusters": 0}, "clusters"), ({"clusters": 1.5}, "clusters"), ({"keep": "8"}, "keep"),
             ({"clusters": 0.5, "keep": 10_000}, "keep"), ({"scatter_layer": 0}, "scatter_layer"),
             ({"scatter_layer": 1, "prune_layer": 1}, "prune_layer"), ({"prune_layer": 3}, "prune_layer"),
             ({"selector": "kmeans"}, "selector"), ({"selector": "seg_first"}, "instances"),
             ({"scatter_mode": "copy"}, "scatter_mode"), ({"seg_token_id": -1}, "seg_token_id"),
             ({"clusters": 0.5, "seg_token_id": 127}, "seg_token_id")),
        status="clustering, scattering and pruning on the stage engine (LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL); a "
               "LISA-style segmenter and LISA checkpoint loader; tiny preset on a tiny-LISA test-bed trained here; "
               "full preset (a LISA checkpoint on ReasonSeg / RefCOCO from paths) built, not run on real weights",
    ),
)
