"""The baselines' registry entries (``prunelab.registry``): same budgets, no paper."""

from prunelab.methods.baselines import (
    CLSAttention,
    DenseDecode,
    OracleTopK,
    RandomDrop,
    RandomExit,
    RandomPrune,
    RandomVim,
    SinkRecent,
)
from prunelab.methods.top_vim.entry import plain_alignment
from prunelab.registry import MethodEntry

_KV_BAD = (({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"), ({"gqa_mode": "mean"}, "gqa_mode"),
           ({"dense_layers": (0.5,)}, "dense_layers"),
           ({"dense_layers": (0, 7)}, "dense_layers"))  # a layer the 3-layer tiny models lack: refused at install

ENTRIES = (
    MethodEntry(
        name="random_drop", cls=RandomDrop, family="ViT classification", seams=("vit",), budget="keep_ratio",
        backbones=("timm ViT",), keep_all={"keep_ratio": 1.0}, prune={"keep_ratio": 0.5},
        bad=(({"keep_ratio": 1.5}, "keep_ratio"), ({"seed": "0"}, "seed")),
        status="uniformly random patch tokens at Zero-TPrune's schedule; seeded per sample",
    ),
    MethodEntry(
        name="cls_attention", cls=CLSAttention, family="ViT classification", seams=("vit",), budget="keep_ratio",
        backbones=("timm ViT with a class token",), keep_all={"keep_ratio": 1.0}, prune={"keep_ratio": 0.5},
        bad=(({"keep_ratio": 1.5}, "keep_ratio"), ({"blocks": (-1,)}, "blocks")),
        status="the patch tokens the class token attends to most (head mean) at Zero-TPrune's schedule",
    ),
    MethodEntry(
        name="random_exit", cls=RandomExit, family="ViT segmentation", seams=("segmenter",), budget="rates",
        backbones=("prunelab Segmenter",), keep_all={"rates": (0.0, 0.0)}, prune={"rates": (0.5, 0.5)},
        bad=(({"rates": (1.5,)}, "rates"), ({"rates": 0.5}, "rates"), ({"seed": "0"}, "seed")),
        status="uniformly random exits at DToP's stages, at the share of tokens DToP exits",
    ),
    MethodEntry(
        name="random_vim", cls=RandomVim, family="vision SSM", seams=("vim",), budget="keep_ratio",
        backbones=("prunelab VisionMamba", "prunelab PlainMamba"), keep_all={"keep_ratio": 1.0},
        prune={"keep_ratio": 0.5}, tiny=plain_alignment,
        bad=(({"keep_ratio": 1.5}, "keep_ratio"), ({"seed": "0"}, "seed"), ({"alignment": "naive"}, "alignment")),
        status="uniformly random tokens at ToP-ViM's blocks, keep counts and alignment; seeded per image",
    ),
    MethodEntry(
        name="random_prune", cls=RandomPrune, family="VLM", seams=("vlm",),
        backbones=("transformers LLaVA-1.5", "LLaVA-NeXT", "Qwen2.5-VL"),
        keep_all={"budget": 1.0}, prune={"budget": 0.25},
        bad=(({"budget": 0}, "budget"), ({"budget": 1.5}, "budget"), ({"seed": 0.5}, "seed"), ({"layer": -1}, "layer")),
        status="uniformly random visual tokens per image after the projector, or after an LLM layer (`layer`); seeded "
               "per image of a prompt",
    ),
    MethodEntry(
        name="oracle_topk", cls=OracleTopK, family="LLM KV cache", seams=("decoder",),
        backbones=("transformers Llama", "Qwen2", "Qwen3", "Mistral"),
        keep_all={"budget": 10**6}, prune={"budget": 6}, bad=_KV_BAD,
        status="the top budget tokens of the full logits q.k (what FASA approximates)",
    ),
    MethodEntry(
        name="sink_recent", cls=SinkRecent, family="LLM KV cache", seams=("decoder",),
        backbones=("transformers Llama", "Qwen2", "Qwen3", "Mistral"),
        keep_all={"budget": 10**6}, prune={"budget": 10, "n_sink": 2},
        bad=(*_KV_BAD, ({"n_sink": -1}, "n_sink"), ({"budget": 4, "n_sink": 4}, "n_sink")),
        status="StreamingLLM: attention sinks plus the recent window",
    ),
    MethodEntry(
        name="dense_decode", cls=DenseDecode, family="LLM KV cache", seams=("decoder",),
        backbones=("transformers Llama", "Qwen2", "Qwen3", "Mistral"), keep_all={}, prune={},
        bad=_KV_BAD[:2],
        status="dense attention through the same seam and cache (the fair baseline for decode timings)",
    ),
)
