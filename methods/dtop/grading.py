"""DToP's grading (Tang et al., ICCV 2023): which active tokens exit after an auxiliary head.

Pure tensor functions, no model. Shapes: B images, N tokens, C classes.

- :func:`max_class_probability` is the generic confidence (a per-token softmax head, SETR-Naive or Segmenter):
  ``P[b, i, c] = softmax_c(logits[b, i])``.
- :func:`atm_probability` is SegViT's ATM confidence as DToP's official ``PruneHead`` computes it: each class
  query's presence probability (a softmax over two logits, present and "no object") times the sigmoid of its
  mask logit for the token.
- :func:`exit_mask` grades: a token is easy when its top probability is *strictly* above ``p0``; of each class's
  ``n_c`` easy tokens the ``min(k, n_c)`` most confident stay active as context and the rest exit.
"""

from __future__ import annotations

import torch


def max_class_probability(logits: torch.Tensor) -> torch.Tensor:
    """Per-token class probabilities ``[B, N, C]`` from per-token logits ``[B, N, C]`` (softmax in float32)."""
    return logits.float().softmax(-1)


def atm_probability(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """SegViT/ATM confidence ``P[b, i, c] = softmax(class_logits[b, c])[0] * sigmoid(mask_logits[b, i, c])``.

    Args:
        class_logits: [B, C, 2] each class query's (present, no object) logits.
        mask_logits: [B, N, C] each class query's cross-attention logit to each token (heads averaged).
    """
    if class_logits.shape[-2:] != (mask_logits.shape[-1], 2):
        raise ValueError(f"class_logits: expected [B, {mask_logits.shape[-1]}, 2] (present, no object) per class "
                         f"query, got {tuple(class_logits.shape)}")
    presence = class_logits.float().softmax(-1)[..., 0]
    return presence[:, None, :] * mask_logits.float().sigmoid()


def exit_mask(probs: torch.Tensor, active: torch.Tensor, p0: float, k: int) -> torch.Tensor:
    """Tokens that exit at this stage: easy (``max_c P > p0``), active, and not among their class's k most
    confident easy tokens.

    Args:
        probs: [B, N, C] class probabilities of the stage's head (rows of inactive tokens are ignored).
        active: [B, N] bool, the tokens that reached this stage.
        p0: confidence threshold; the test is strict, so ``p0 >= 1`` exits nothing.
        k: easy tokens kept per class and image as context (``min(k, n_c)`` of them).

    Returns:
        [B, N] bool; ties in confidence keep the lower token index active.
    """
    conf, cls = probs.max(-1)
    easy = active & (conf > p0)
    if k == 0 or not bool(easy.any()):
        return easy
    B, N = easy.shape
    C = probs.shape[-1]
    # rank each easy token within its class by confidence: sort by confidence (descending, stable), then by
    # class (stable), so each class's easy tokens form one run ordered by confidence; the rank is the offset in it
    group = torch.where(easy, cls, torch.full_like(cls, C))
    order = torch.sort(conf.masked_fill(~easy, -1.0), dim=-1, descending=True, stable=True).indices
    order = torch.gather(order, 1, torch.sort(torch.gather(group, 1, order), dim=-1, stable=True).indices)
    sorted_group = torch.gather(group, 1, order)
    pos = torch.arange(N, device=probs.device).expand(B, N)
    start = torch.zeros(B, C + 1, dtype=torch.int64, device=probs.device).scatter_reduce(
        1, sorted_group, pos, reduce="amin", include_self=False)
    rank = torch.empty_like(pos).scatter_(1, order, pos - torch.gather(start, 1, sorted_group))
    return easy & (rank >= k)
