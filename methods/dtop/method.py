"""DToP: Dynamic Token Pruning in Plain Vision Transformers for Semantic Segmentation (Tang, Zhang, Liu, Liu, Liu;
ICCV 2023, arXiv 2308.01045). Official code: github.com/zbwxp/Dynamic-Token-Pruning (BSD-2-Clause).

After every auxiliary head but the last, each active token is graded by its top class probability; tokens above
``p0`` exit with their prediction frozen, except the ``k`` most confident of each class, which stay as context.
The stage loop itself is :mod:`prunelab.methods.dtop.seam`; see README.md for what differs from the
official code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prunelab.common.validate import check_choice, check_int, check_real
from prunelab.methods.dtop.grading import exit_mask
from prunelab.methods.dtop.heads import HeadOutput
from prunelab.methods.dtop.seam import FREEZE


@dataclass(frozen=True)
class DToP:
    """DToP's hyperparameters.

    Attributes:
        p0: confidence threshold; a token is easy when its top class probability is strictly above it (official
            configs: 0.9 for ViT-B on ADE20K, 0.95 for ViT-L). ``p0 = 1`` exits nothing.
        k: easy tokens kept active per class and image as context (official code: 5).
        freeze: what an exited token keeps: ``"mask_logit"`` (the official ATM code: only its mask logit is
            frozen; the class-presence weights that multiply it come from the final head) or
            ``"full_prediction"`` (its whole prediction at exit). The two agree for per-token softmax heads.
        confidence: ``(head, HeadOutput) -> probs [B, N, C]``; ``None`` uses the head's own (max class
            probability for a linear head, presence x mask sigmoid for ATM).
    """

    p0: float = 0.9
    k: int = 5
    freeze: str = "mask_logit"
    confidence: Callable[[torch.nn.Module, HeadOutput], torch.Tensor] | None = None

    def __post_init__(self):
        object.__setattr__(self, "p0", check_real(self.p0, "p0", low=0.0, high=1.0))
        object.__setattr__(self, "k", check_int(self.k, "k", low=0))
        check_choice(self.freeze, "freeze", FREEZE)
        if self.confidence is not None and not callable(self.confidence):
            raise ValueError(f"confidence: expected a callable (head, output) -> probs, got {self.confidence!r}")

    def probabilities(self, head: torch.nn.Module, out: HeadOutput) -> torch.Tensor:
        return head.probabilities(out) if self.confidence is None else self.confidence(head, out)

    def exits(self, stage: int, probs: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """[B, N] bool: the active tokens that exit after ``stage`` (see :func:`grading.exit_mask`)."""
        return exit_mask(probs, active, self.p0, self.k)
