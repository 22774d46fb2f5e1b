"""ToP-ViM: token pruning in vision state-space models (Zhan et al., NeurIPS 2024, arXiv 2409.18962).

The method (:class:`ToPViM`, installed with ``prunelab.apply``), its pure importance and selection functions, the
analytic MACs, and the plain-PyTorch backbones it prunes, Vim (hustvl/Vim dd0358a) and PlainMamba
(ChenhongyiYang/PlainMamba 0975a1d), with the selective scan and the checkpoint loaders. See README.md.
"""

from prunelab.methods.top_vim.checkpoint import (
    load_plain_mamba_checkpoint,
    load_vim_checkpoint,
    read_plain_mamba_state_dict,
    read_vim_state_dict,
)
from prunelab.methods.top_vim.flops import PlainDims, VimDims, dense_macs, plain_mamba_macs, top_vim_macs, vim_macs
from prunelab.methods.top_vim.importance import channel_reduce, ssm_signal, token_importance
from prunelab.methods.top_vim.method import ToPViM, scaled_blocks
from prunelab.methods.top_vim.plain_mamba import (
    PlainMamba,
    PlainMambaConfig,
    PlainSSMOutput,
    plain_mamba_l1,
    plain_mamba_l2,
    plain_mamba_l3,
    zigzag_orders,
)
from prunelab.methods.top_vim.scan import selective_scan_ref
from prunelab.methods.top_vim.seam import ToPViMHandle, ToPViMState
from prunelab.methods.top_vim.selection import (
    check_vim_reduction,
    cls_layout,
    plain_keep_count,
    select_plain,
    select_tokens,
    vim_keep_count,
)
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

__all__ = ["ToPViM", "scaled_blocks", "token_importance", "ssm_signal", "channel_reduce", "select_tokens",
           "vim_keep_count", "cls_layout", "check_vim_reduction", "ToPViMHandle", "ToPViMState", "VimDims",
           "vim_macs", "dense_macs", "top_vim_macs",
           "selective_scan_ref", "VimMixer", "VimBlock", "VisionMamba", "VimConfig", "VimLayout", "SSMOutputs",
           "RMSNorm", "add_norm", "unflip", "vim_tiny", "vim_small", "load_vim_checkpoint", "read_vim_state_dict",
           "PlainMamba", "PlainMambaConfig", "PlainSSMOutput", "plain_mamba_l1", "plain_mamba_l2", "plain_mamba_l3",
           "zigzag_orders", "PlainDims", "plain_mamba_macs", "plain_keep_count", "select_plain",
           "load_plain_mamba_checkpoint", "read_plain_mamba_state_dict"]
