"""ToP-ViM's registry entry (``prunelab.registry``)."""

from prunelab.methods.top_vim.method import ToPViM
from prunelab.methods.top_vim.plain_mamba import PlainMamba
from prunelab.registry import MethodEntry


def plain_alignment(model) -> dict:
    """PlainMamba takes the ``gapped`` alignment (its biases make a zeroed slot nonzero: no ``zero_slot``)."""
    return {"alignment": "gapped"} if isinstance(model, PlainMamba) else {}


ENTRIES = (
    MethodEntry(
        name="top_vim", cls=ToPViM, family="vision SSM", seams=("vim",), baselines=("random_vim",),
        reproduction="top_vim",
        paper="Exploring Token Pruning in Vision State Space Models (NeurIPS 2024)",
        backbones=("prunelab VisionMamba (hustvl Vim-T/S checkpoints)",
                   "prunelab PlainMamba (ChenhongyiYang/PlainMamba L1/L2/L3 checkpoints)"), budget="keep_ratio",
        tiny=plain_alignment,
        keep_all={"keep_ratio": 1.0}, prune={"keep_ratio": 0.5},
        bad=(({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": 1.5}, "keep_ratio"),
             ({"keep_ratio": "0.8"}, "keep_ratio"), ({"blocks": (0,)}, "blocks"), ({"blocks": (3, 3)}, "blocks"),
             ({"blocks": (99,)}, "blocks"), ({"alignment": "naive"}, "alignment"),
             ({"importance_norm": "max"}, "importance_norm"), ({"importance_source": "flipped"}, "importance_source"),
             ({"selection": "top"}, "selection"), ({"selection": "official"}, "selection")),
        status="Vim-T/S and PlainMamba-L1/L2/L3 in plain PyTorch (released checkpoints load); four alignments incl. "
               "a packed 'gapped' fast path; tiny preset on a trained Vim test-bed, full preset, notebook",
    ),
)
