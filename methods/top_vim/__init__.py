"""ToP-ViM: token pruning in vision state-space models (Zhan et al., NeurIPS 2024, arXiv 2409.18962).

For now the dense backbone only: a plain-PyTorch Vim (hustvl/Vim dd0358a) with its selective scan, which the method
will hook into.
"""

from prunelab.methods.top_vim.checkpoint import load_vim_checkpoint, read_vim_state_dict
from prunelab.methods.top_vim.scan import selective_scan_ref
from prunelab.methods.top_vim.vim import (
    RMSNorm,
    SSMOutputs,
    VimBlock,
    VimConfig,
    VimLayout,
    VimMixer,
    VisionMamba,
    add_norm,
    unflip,
    vim_small,
    vim_tiny,
)

__all__ = ["selective_scan_ref", "VimMixer", "VimBlock", "VisionMamba", "VimConfig", "VimLayout", "SSMOutputs",
           "RMSNorm", "add_norm", "unflip", "vim_tiny", "vim_small", "load_vim_checkpoint", "read_vim_state_dict"]
