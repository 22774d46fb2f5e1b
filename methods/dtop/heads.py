"""Segmentation heads for DToP's stages: each gives per-token outputs, the probabilities that grade the tokens,
and the segmentation scores that go on the canvas.

- :class:`LinearHead`: a per-token linear classifier (SETR-Naive style); its probabilities are the softmax of its
  logits and its scores are the logits themselves.
- :class:`ATMHead`: SegViT's Attention-to-Mask decoder as DToP's official code uses it (``PruneHead``: width half
  the backbone's, 3 decoder layers, one query per class). Its per-token output is the *mask logit* ``l[c, i]``
  (the last layer's query-to-token attention logits, heads averaged); its image output each query's (present,
  no object) logits; probabilities and scores are both ``softmax(presence_c)[0] * sigmoid(l[c, i])``.

Every head takes ``valid`` [B, N] (bool, or ``None`` for all): tokens that exited or pad a ragged batch are no
keys of the ATM cross-attention, and their rows are ignored by the caller.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunelab.methods.dtop.grading import atm_probability, max_class_probability


class HeadOutput(NamedTuple):
    """``tokens``: [B, N, C] per-token logits (mask logits for ATM); ``image``: [B, C, 2] each class query's
    (present, no object) logits (ATM) or ``None``."""

    tokens: torch.Tensor
    image: torch.Tensor | None = None


class LinearHead(nn.Module):
    """LayerNorm then a linear classifier on every token."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> HeadOutput:
        return HeadOutput(self.fc(self.norm(x)))

    def probabilities(self, out: HeadOutput) -> torch.Tensor:
        return max_class_probability(out.tokens)

    def scores(self, tokens: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        return tokens

    def loss(self, out: HeadOutput, target: torch.Tensor, grid: tuple[int, int], ignore_index: int = 255
             ) -> torch.Tensor:
        """Per-pixel cross-entropy of the logits upsampled to ``target`` [B, H, W]."""
        return F.cross_entropy(upsample(out.tokens, grid, target.shape[-2:]), target, ignore_index=ignore_index)

    def macs(self, n: int) -> int:
        return n * self.fc.in_features * self.num_classes


class _ATMLayer(nn.Module):
    """One decoder layer: query self-attention, query-to-token cross-attention (whose logits are the masks), MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, mem: torch.Tensor, valid: torch.Tensor | None):
        q = self.norm1(q + self.self_attn(q, q, q, need_weights=False)[0])
        B, C, d = q.shape
        h = self.heads
        qh = self.q(q).view(B, C, h, d // h).transpose(1, 2)
        kh = self.k(mem).view(B, -1, h, d // h).transpose(1, 2)
        vh = self.v(mem).view(B, -1, h, d // h).transpose(1, 2)
        logits = qh @ kh.transpose(-2, -1) / (d // h) ** 0.5  # [B, h, C, N]
        masked = logits if valid is None else logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        attn = masked.softmax(-1).nan_to_num(0.0)  # an image with no valid token attends to nothing
        q = self.norm2(q + self.proj((attn @ vh).transpose(1, 2).reshape(B, C, d)))
        q = self.norm3(q + self.mlp(q))
        return q, logits


class ATMHead(nn.Module):
    """SegViT's ATM decoder with one learnable query per class."""

    def __init__(self, dim: int, num_classes: int, *, width: int | None = None, layers: int = 3, heads: int = 6):
        super().__init__()
        width = width or dim // 2
        if width % heads:
            raise ValueError(f"heads: the ATM width {width} is not divisible by {heads} heads")
        self.num_classes, self.width = num_classes, width
        self.input_proj = nn.Sequential(nn.Linear(dim, width), nn.LayerNorm(width))
        self.queries = nn.Parameter(torch.randn(num_classes, width) * 0.02)
        self.layers = nn.ModuleList(_ATMLayer(width, heads) for _ in range(layers))
        self.cls = nn.Linear(width, 2)  # per query: present, no object

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> HeadOutput:
        mem = self.input_proj(x)
        q = self.queries.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            q, logits = layer(q, mem, valid)
        return HeadOutput(logits.mean(1).transpose(1, 2), self.cls(q))  # mask logits, heads averaged, [B, N, C]

    def probabilities(self, out: HeadOutput) -> torch.Tensor:
        return atm_probability(out.image, out.tokens)

    def scores(self, tokens: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        return atm_probability(image, tokens)

    def loss(self, out: HeadOutput, target: torch.Tensor, grid: tuple[int, int], ignore_index: int = 255,
             weights: tuple[float, float, float] = (1.0, 20.0, 1.0), no_object: float = 0.1) -> torch.Tensor:
        """SegViT's ATM loss as the official code computes it, one query per class (no matching):

        - presence: cross-entropy of each query's (present, no object) logits, "present" for the classes in the
          image, the no-object target weighted ``no_object``;
        - masks, for the classes present: sigmoid focal loss (alpha 0.25, gamma 2; mean over pixels) and dice loss
          of the mask logits upsampled to ``target``, each summed over the image's classes and divided by the
          number of present classes in the batch. Ignored pixels count as negatives, as in the official code.

        ``weights``: (presence, focal, dice), the configs' (1, 20, 1).
        """
        B, _, C = out.tokens.shape
        present = torch.zeros(B, C, dtype=torch.bool, device=target.device)
        for b in range(B):
            cls = target[b].unique()
            present[b, cls[(cls != ignore_index) & (cls < C)]] = True
        cls_target = (~present).long()  # 0: present, 1: no object
        loss_ce = F.cross_entropy(out.image.reshape(-1, 2).float(), cls_target.flatten(),
                                  weight=torch.tensor([1.0, no_object], device=target.device))
        b, c = present.nonzero(as_tuple=True)
        if len(b) == 0:
            return weights[0] * loss_ce
        logits = out.tokens.transpose(1, 2).reshape(B, C, *grid)[b, c]  # the present classes' masks
        logits = F.interpolate(logits[:, None].float(), size=target.shape[-2:], mode="bilinear",
                               align_corners=False)[:, 0].flatten(1)
        truth = (target[b] == c[:, None, None]).flatten(1).float()
        prob = logits.sigmoid()
        ce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
        p_t = prob * truth + (1 - prob) * (1 - truth)
        focal = (ce * (1 - p_t) ** 2 * (0.25 * truth + 0.75 * (1 - truth))).mean(1).sum() / len(b)
        dice = (1 - (2 * (prob * truth).sum(1) + 1) / (prob.sum(1) + truth.sum(1) + 1)).sum() / len(b)
        return weights[0] * loss_ce + weights[1] * focal + weights[2] * dice

    def macs(self, n: int) -> int:
        """MACs over ``n`` tokens (the queries' own work, independent of ``n``, included)."""
        if n == 0:
            return 0
        d, C, L = self.width, self.num_classes, len(self.layers)
        proj = n * self.input_proj[0].in_features * d
        per_layer = 4 * C * d * d + 2 * C * C * d + 2 * n * d * d + 2 * C * n * d + 2 * C * d * d + 8 * C * d * d
        return proj + L * per_layer + C * d * 2


def upsample(scores: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Per-token scores [B, N, C] on the ``grid`` as a [B, C, H, W] map, bilinearly upsampled to ``size``."""
    B, N, C = scores.shape
    m = scores.transpose(1, 2).reshape(B, C, *grid)
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)
