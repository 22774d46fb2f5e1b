"""Baselines every paper is compared against at the same budget: random drop/prune, CLS attention, sink+recent,
oracle top-k, random exit, random vision-Mamba pruning.

The KV-cache baselines (``kv.py``) are ``prunelab.common.kv_selection.KVSelection`` subclasses, the decode-step
machinery they share with FASA; the random baselines draw per sample, so a batch keeps what each sample keeps.
"""

from prunelab.methods.baselines.cls_attention import CLSAttention
from prunelab.methods.baselines.kv import DenseDecode, OracleTopK, SinkRecent
from prunelab.methods.baselines.random_drop import RandomDrop
from prunelab.methods.baselines.random_exit import RandomExit
from prunelab.methods.baselines.random_prune import RandomPrune
from prunelab.methods.baselines.random_vim import RandomVim

__all__ = ["RandomDrop", "CLSAttention", "RandomExit", "RandomPrune", "RandomVim", "OracleTopK", "SinkRecent",
           "DenseDecode"]
