"""CATP's registry entry (``prunelab.registry``)."""

from prunelab.methods.catp.method import CATP
from prunelab.registry import MethodEntry


def _tiny(model) -> dict:
    """The tiny language models have 3 layers, where K = 6 does not exist: the attention increase reads layers 0 and
    1 and both LLM stages run after layer 1 (the query stage after the context stage)."""
    return {"layer": 1, "query_layer": 1}


def _tiny_budget(model, ratio: float) -> dict:
    """Keep ratio ``ratio`` of the image tokens in the shared tiny preset: R = 1 - ratio, on LLaVA-NeXT of the whole
    packed span as the other methods there prune it (ratio 1.0 is then exactly the dense model)."""
    return {"ratio": 1.0 - ratio, "next_tokens": "anyres"}


ENTRIES = (
    MethodEntry(
        name="catp", cls=CATP, family="VLM", seams=("vlm",), for_model="for_model",
        paper="CATP: Contextually Adaptive Token Pruning for Efficient and Enhanced Multimodal In-Context Learning "
              "(AAAI 2026, arXiv 2508.07871)",
        backbones=("transformers LLaVA-1.5", "LLaVA-NeXT", "Qwen2.5-VL"), baselines=("random_prune", "divprune"),
        tiny=_tiny, tiny_budget=_tiny_budget, reproduction="catp", full={"ratio": 0.778},
        keep_all={"ratio": 0.0, "next_tokens": "anyres"}, prune={"ratio": 0.5},
        bad=(({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"ratio": "0.5"}, "ratio"),
             ({"lambda_1": -1.0}, "lambda_1"), ({"lambda_2": float("nan")}, "lambda_2"), ({"layer": 0}, "layer"),
             ({"layer": 1, "query_layer": 0}, "query_layer"), ({"layer": 2, "query_layer": 2}, "layer"),
             ({"next_tokens": "crops"}, "next_tokens"), ({"context_mean": "text"}, "context_mean"),
             ({"llm_positions": "renumber"}, "llm_positions")),
        status="LLaVA-1.5, LLaVA-NeXT (base tile, the paper's 576 tokens, or the whole packed span), Qwen2.5-VL on the "
               "stage engine, any number of images per prompt; a demonstration set cached once for many queries; "
               "tiny preset on an in-context test-bed trained here; full preset through lmms-eval, 4-shot, built, "
               "not run on real weights",
    ),
)
