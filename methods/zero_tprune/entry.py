"""Zero-TPrune's registry entry (``prunelab.registry``)."""

from prunelab.methods.zero_tprune.method import ZeroTPrune
from prunelab.registry import MethodEntry

ENTRIES = (
    MethodEntry(
        name="zero_tprune", cls=ZeroTPrune, family="ViT classification", seams=("vit",),
        paper="Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph (CVPR 2024)",
        backbones=("timm deit_*", "timm deit_*_distilled_*", "timm vit_*_augreg*"),
        baselines=("random_drop",), budget="keep_ratio", reproduction="zero_tprune",
        keep_all={"keep_ratio": 1.0}, prune={"keep_ratio": 0.5},
        bad=(({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": -0.5}, "keep_ratio"),
             ({"keep_ratio": 1.5}, "keep_ratio"), ({"keep_ratio": "0.5"}, "keep_ratio"),
             ({"cls_boost": "no"}, "cls_boost"), ({"iterations": (2.5, 5, 1)}, "iterations"),
             ({"iterations": (0, 1, 1)}, "iterations"), ({"vhf_band": (0.5, 0.1)}, "vhf_band"),
             ({"similarity_share": 1.5}, "similarity_share"), ({"gflops": -1.0}, "gflops"),
             ({"blocks": (1.0,)}, "blocks")),
        status="reproduced (tiny); full preset needs ImageNet + DeiT weights",
    ),
)
