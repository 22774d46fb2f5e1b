"""What prunelab holds: methods, their family, backbones and reproduction entry, as a static table.

A static table (no import-time registration) keeps ``prunelab list`` instant and side-effect free.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str  # package under prunelab.methods and reproductions
    paper: str
    family: str
    backbones: tuple[str, ...]
    classes: tuple[str, ...]  # public method objects in prunelab.methods.<name>
    status: str


METHODS: tuple[MethodInfo, ...] = (
    MethodInfo(
        name="zero_tprune",
        paper="Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph (CVPR 2024)",
        family="ViT classification",
        backbones=("timm deit_*", "timm deit_*_distilled_*", "timm vit_*_augreg*"),
        classes=("ZeroTPrune", "RandomDrop"),
        status="reproduced (tiny); full preset needs ImageNet + DeiT weights",
    ),
    MethodInfo(
        name="fasa",
        paper="FASA: Frequency-aware Sparse Attention (ICLR 2026)",
        family="LLM KV cache",
        backbones=("transformers Llama", "Qwen2", "Qwen3", "Mistral"),
        classes=("FASA", "OracleTopK", "SinkRecent", "DenseDecode"),
        status="tiny on SmolLM2-135M (real weights); full preset needs the paper's models + LongBench-V1",
    ),
    MethodInfo(
        name="divprune",
        paper="DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (CVPR 2025)",
        family="VLM",
        backbones=("transformers LLaVA-1.5", "LLaVA-NeXT", "Qwen2.5-VL"),
        classes=("DivPrune",),
        status="LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL; tiny preset on random tiny VLMs; full preset (lmms-eval) "
               "needs the checkpoints, task data and a GPU",
    ),
    MethodInfo(
        name="hiprune",
        paper="HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models "
              "(arXiv 2508.00553)",
        family="VLM",
        backbones=("transformers LLaVA-1.5", "LLaVA-NeXT", "Qwen2.5-VL"),
        classes=("HiPrune",),
        status="LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL; tiny preset on random tiny VLMs; full preset (lmms-eval) "
               "needs the checkpoints, task data and a GPU",
    ),
)

BACKBONES = {
    "timm ViT": "prunelab.common.vit (blocks ask for attention statistics; others keep fused SDPA)",
    "HF decoder": "prunelab.common.decoder (registered 'prunelab' attention function + in-place KV cache)",
    "HF VLM": "prunelab.common.vlm (hooks after the projector / in the vision tower; LLaVA-1.5, NeXT, Qwen2.5-VL)",
}


def reproducible() -> list[str]:
    """Methods that have a reproduction (``prunelab.reproductions.<name>.run``), in table order."""
    import importlib.util

    def has_run(name: str) -> bool:
        try:
            return importlib.util.find_spec(f"prunelab.reproductions.{name}.run") is not None
        except ModuleNotFoundError:  # no reproductions/<name> package at all
            return False

    return [m.name for m in METHODS if has_run(m.name)]


def get(name: str) -> MethodInfo:
    for m in METHODS:
        if m.name == name:
            return m
    raise KeyError(f"paper: unknown method {name!r}; known: {', '.join(m.name for m in METHODS)}")
