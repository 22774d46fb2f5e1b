"""HiPrune's registry entry (``prunelab.registry``)."""

from prunelab.methods.hiprune.method import HiPrune
from prunelab.registry import MethodEntry


def _tiny(model) -> dict:
    """The tiny towers have 3-4 blocks, where the paper's object block (CLIP layer 9 of 24, Qwen block 16) does not
    exist: the first CLIP block and Qwen's first full-attention block are the shallow analogue; the deep block keeps
    its default (LLaVA's feature layer; Qwen's last block). NeXT's row separators stay (``keep_newlines``), so ratio
    1.0 is exactly the dense model."""
    from prunelab.common.vlm_layout import vlm_family

    return {"object_block": 1 if vlm_family(model) == "qwen2_5_vl" else 0, "keep_newlines": True}


ENTRIES = (
    MethodEntry(
        name="hiprune", cls=HiPrune, family="VLM", seams=("vlm",), for_model="for_model",
        paper="HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models "
              "(arXiv 2508.00553)",
        backbones=("transformers LLaVA-1.5", "LLaVA-NeXT", "Qwen2.5-VL"), baselines=("random_prune",),
        reproduction="hiprune", tiny=_tiny,
        keep_all={"budget": 1.0}, prune={"budget": 0.25},
        bad=(({"budget": 0}, "budget"), ({"budget": 2.0}, "budget"), ({"anchor_ratio": 1.5}, "anchor_ratio"),
             ({"encoder": "vit"}, "encoder"), ({"official_quirks": "yes"}, "official_quirks"),
             ({"keep_newlines": 1}, "keep_newlines"), ({"object_block": 0.5}, "object_block")),
        status="LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL; tiny preset on random tiny VLMs; full preset (lmms-eval) "
               "needs the checkpoints, task data and a GPU",
    ),
)
