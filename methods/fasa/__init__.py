"""FASA: frequency-aware sparse attention over the KV cache of RoPE decoders (Wang et al., ICLR 2026).

See README.md for the map from the paper to the code and every deviation.
"""

from .calibration import DEFAULT_KS, Calibration, calibrate
from .chunks import FC_LAYOUTS, chunk_dims, chunk_logits, contextual_agreement, dominant_chunks, dominant_dims
from .method import FASA, DenseDecode, OracleTopK, SinkRecent
from .select import GQA_MODES, KVSelection, budget_counts

__all__ = ["FASA", "OracleTopK", "SinkRecent", "DenseDecode", "KVSelection", "Calibration", "calibrate",
           "DEFAULT_KS", "FC_LAYOUTS", "GQA_MODES", "budget_counts", "chunk_dims", "chunk_logits",
           "contextual_agreement", "dominant_chunks", "dominant_dims"]
