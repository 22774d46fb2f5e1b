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
)

BACKBONES = {
    "timm ViT": "prunelab.common.vit (blocks ask for attention statistics; others keep fused SDPA)",
    "HF decoder": "prunelab.common.decoder (registered 'prunelab' attention function + in-place KV cache)",
}


def get(name: str) -> MethodInfo:
    for m in METHODS:
        if m.name == name:
            return m
    raise KeyError(f"paper: unknown method {name!r}; known: {', '.join(m.name for m in METHODS)}")
