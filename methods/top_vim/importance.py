"""ToP-ViM's token importance from the SSM outputs (pure functions, no model).

Paper: Zhan et al., "Exploring Token Pruning in Vision State Space Models", NeurIPS 2024 (arXiv 2409.18962). Official
code compared: ZLKong/ToP-ViM at b5bc231 (``vim/models_mamba.py``, the active pruning block;
``mamba-1p1p1/mamba_ssm/modules/mamba_simple.py``, which stores the backward branch's output as ``xai_b``).

The paper scores token t by the SSM block's output y before ``out_proj``, clipped at zero and summed over the D'
channels: ``S_t = sum_d max(0, y_{t,d})``. Its ablation compares that clipping with the l1 norm, the l2 norm and
the plain sum (``norm``). Which scan directions feed y in bidirectional Vim is open; ``source`` chooses:

- ``"both"`` (default): the forward output plus the backward output flipped back to token order, which is the
  tensor ``out_proj`` reads (times 1/2 when ``if_divide_out``, which changes no ranking);
- ``"forward"`` / ``"backward"``: one direction, in token order;
- ``"official_bwd_unflipped"``: the official code's active path scores ``xai_b``, the backward branch as computed
  on the flipped sequence, without flipping it back, so the score at index i belongs to token L - 1 - i (the middle
  CLS maps onto itself). Together with ``norm="none"`` (the active path's unclipped ``xai_b.sum(dim=1)``) this
  reproduces the official scores exactly; with ``norm="clip"`` it is the official commented-out masking variant.
"""

from __future__ import annotations

import torch

from prunelab.common.validate import check_choice
from prunelab.methods.top_vim.vim import SSMOutputs

NORMS = ("clip", "l1", "l2", "none")
SOURCES = ("both", "forward", "backward", "official_bwd_unflipped")

__all__ = ["NORMS", "SOURCES", "ssm_signal", "channel_reduce", "token_importance"]


def ssm_signal(ssm: SSMOutputs, source: str = "both") -> torch.Tensor:
    """The scan output y [B, D', L] that importance is computed from, in float32.

    Args:
        ssm: a mixer's two gated scan outputs (``fwd`` and ``bwd_flipped``, each [B, D', L]).
        source: ``"both"``, ``"forward"``, ``"backward"`` or ``"official_bwd_unflipped"`` (module docstring).
    """
    check_choice(source, "source", SOURCES)
    if source == "forward":
        return ssm.fwd.float()
    if source == "backward":
        return ssm.bwd().float()
    if source == "official_bwd_unflipped":
        return ssm.bwd_flipped.float()  # deliberately left in the flipped frame, as the official code scores it
    return ssm.fwd.float() + ssm.bwd().float()


def channel_reduce(y: torch.Tensor, norm: str = "clip") -> torch.Tensor:
    """Per-token importance [B, L] from y [B, D', L], reduced over the channels D'.

    Args:
        y: [B, D', L] an SSM output.
        norm: ``"clip"`` sum of max(0, y) (the paper's), ``"l1"`` sum of |y|, ``"l2"`` sqrt of the sum of y^2,
            ``"none"`` the plain sum. All four are positively homogeneous: S(a y) = a S(y) for a > 0.
    """
    check_choice(norm, "norm", NORMS)
    if norm == "clip":
        return y.clamp(min=0).sum(1)
    if norm == "l1":
        return y.abs().sum(1)
    if norm == "l2":
        return torch.linalg.vector_norm(y, dim=1)
    return y.sum(1)


def token_importance(ssm: SSMOutputs, norm: str = "clip", source: str = "both") -> torch.Tensor:
    """ToP-ViM's token importance S [B, L] (float32) from one mixer's :class:`SSMOutputs`.

    Index t of the result scores token t, except under ``source="official_bwd_unflipped"`` (index i scores token
    L - 1 - i, the official bug reproduced). Computed without gradient: selection is not differentiated.
    """
    with torch.no_grad():
        return channel_reduce(ssm_signal(ssm, source), norm)
