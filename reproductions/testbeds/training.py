"""What the test-beds' training loops share."""

from __future__ import annotations

import math


def warmup_cosine(progress: float, peak: float, warmup: float) -> float:
    """The learning rate at ``progress`` (0 to 1 over the training compute): linear warm-up to ``peak`` over the
    first ``warmup`` of it, then cosine decay to zero."""
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
