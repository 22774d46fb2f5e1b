"""FASA: frequency-aware sparse attention over the KV cache of RoPE decoders (Wang et al., ICLR 2026).

See README.md for the map from the paper to the code and every deviation. The decode-step machinery it shares
with the KV baselines is ``prunelab.common.kv_selection``; the baselines live in ``prunelab.methods.baselines``.
"""

from .calibration import DEFAULT_KS, Calibration, calibrate
from .chunks import FC_LAYOUTS, chunk_dims, chunk_logits, contextual_agreement, dominant_chunks, dominant_dims
from .method import FASA

__all__ = ["FASA", "Calibration", "calibrate", "DEFAULT_KS", "FC_LAYOUTS", "chunk_dims", "chunk_logits",
           "contextual_agreement", "dominant_chunks", "dominant_dims"]
