"""Baselines every paper is compared against at the same budget: random drop/prune, sink+recent, oracle top-k.

The KV-cache baselines share FASA's decode-step machinery (``KVSelection``) and are defined beside it; they are
exported here so that every baseline has one home.
"""

from prunelab.methods.baselines.random_drop import RandomDrop
from prunelab.methods.baselines.random_prune import RandomPrune
from prunelab.methods.fasa.method import DenseDecode, OracleTopK, SinkRecent

__all__ = ["RandomDrop", "RandomPrune", "OracleTopK", "SinkRecent", "DenseDecode"]
