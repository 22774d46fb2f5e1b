"""DToP's registry entry (``prunelab.registry``)."""

from prunelab.methods.dtop.method import DToP
from prunelab.registry import MethodEntry

ENTRIES = (
    MethodEntry(
        name="dtop", cls=DToP, family="ViT segmentation", seams=("segmenter",),
        paper="Dynamic Token Pruning in Plain Vision Transformers for Semantic Segmentation (ICCV 2023)",
        backbones=("prunelab Segmenter on timm vit_* (linear or ATM heads)",),
        baselines=("random_exit",), budget="p0", reproduction="dtop",
        keep_all={"p0": 1.0}, prune={"p0": 0.0, "k": 1},
        bad=(({"p0": -0.1}, "p0"), ({"p0": 1.5}, "p0"), ({"p0": "0.9"}, "p0"), ({"k": -1}, "k"),
             ({"k": 2.0}, "k"), ({"freeze": "logits"}, "freeze"), ({"confidence": 3}, "confidence")),
        status="tiny on a segmentation test-bed trained here (shipped); full preset (ADE20K, training and "
               "sliding-window evaluation) needs the data and GPUs",
    ),
)
