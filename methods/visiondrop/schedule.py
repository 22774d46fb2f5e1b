"""VisionDrop's token schedule: how many dominant and contextual tokens each stage keeps.

A schedule is one ``(dominant, contextual)`` pair per stage: stage 0 in the vision encoder, then one per LLM stage.
The official LLaVA-1.5 setting (official README: ``--dominant 42 --contextual 6``, ``--layer_list [8,16,24]`` and
``[[30,5],[22,4],[16,3]]``) keeps 48 / 35 / 26 / 19 visual tokens over the four quarters of the 32 LLM layers, an
average of T = 32 per layer.

- :func:`budget_schedule` derives a schedule for another average ``T`` (a rule of ours, not in the paper):
  stage sizes ``s_k = round(T * (48, 35, 26) / 32)`` for the first three, the last one
  ``4 T - s_0 - s_1 - s_2`` so that their mean is exactly ``T``; each size split with the official per-stage
  contextual share (6/48, 5/35, 4/26, 3/19), or one share for every stage.
- :func:`stage_counts` turns a stage's pair into counts for an image holding ``n`` tokens: count pairs are
  absolute at stage 0 (per CLIP tile / Qwen image) and, at LLM stages, scaled to the image's tokens by
  ``n / (d_{k-1} + c_{k-1})`` (exact on LLaVA-1.5, where an image holds exactly the previous size; the official
  code uses them as absolute counts: ``absolute=True``); fraction pairs are shares of ``n``. Scaled or fractional
  counts round half up; the dominant count is at least 1, the contextual count may round to 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from prunelab.common.tokens import keep_count
from prunelab.common.validate import check_int, check_real

__all__ = ["OFFICIAL_BUDGET", "OFFICIAL_SCHEDULE", "budget_schedule", "check_schedule", "share_schedule", "sizes",
           "stage_counts"]

OFFICIAL_BUDGET = 32
OFFICIAL_SCHEDULE = ((42, 6), (30, 5), (22, 4), (16, 3))
"""The official LLaVA-1.5 schedule (official README): stage 0 (the CLS counted among the 42), then LLM layers 8, 16,
24 (1-based boundaries; 0-based: after layers 7, 15, 23)."""


def _half_up(num: int, den: int) -> int:
    """``round(num / den)`` with halves up, in integers (no float error on the official ratios)."""
    return (2 * num + den) // (2 * den)


def _half_up_share(n: int, share: float) -> int:
    """``round(n * share)`` with halves up, possibly 0 (a stage may keep no contextual token on a small image)."""
    return math.floor(n * share + 0.5 + 1e-9)


def budget_schedule(budget: int, contextual_share: float | None = None) -> tuple[tuple[int, int], ...]:
    """The four ``(dominant, contextual)`` pairs whose sizes average ``budget`` (T) tokens.

    Args:
        budget: T, the average visual tokens per image over the four segments (32 gives the official schedule).
        contextual_share: contextual tokens as a share of each stage's size (round half up, at least one dominant);
            ``None``: the official per-stage shares 6/48, 5/35, 4/26, 3/19.

    Raises:
        ValueError: naming ``budget`` when T is too small for four non-empty, non-increasing stages (T < 2).
    """
    budget = check_int(budget, "budget", low=1)
    ref = [d + c for d, c in OFFICIAL_SCHEDULE]
    size = [_half_up(budget * s, OFFICIAL_BUDGET) for s in ref[:3]]
    size.append(4 * budget - sum(size))
    if size[-1] < 1 or any(b > a for a, b in zip(size, size[1:])):
        raise ValueError(f"budget: T={budget} gives stage sizes {size}; the rule needs T >= 2 (four non-empty, "
                         "non-increasing stages)")
    out = []
    for s, (_, c_ref), s_ref in zip(size, OFFICIAL_SCHEDULE, ref):
        if contextual_share is None:
            c = _half_up(s * c_ref, s_ref)
        else:
            c = math.floor(s * contextual_share + 0.5 + 1e-9)
        c = min(c, s - 1)
        out.append((s - c, c))
    return tuple(out)


def share_schedule(share: float, stages: int = 3) -> tuple[tuple[float, float], ...]:
    """Fractions for ``stages`` LLM stages (1 to 3) whose ``stages + 1`` stage sizes, in the official proportions
    (the first of 48 : 35 : 26 : 19), average ``share`` of the encoder tokens, each split with the official
    contextual share of its stage. Each pair is a fraction of the tokens its stage receives, so it works on images
    of any size; rounding (``keep_count``) makes the average approximate on small images.

    This is the rule of the tiny presets, whose language models are too shallow for the paper's three equal
    segments; the average is per LLM layer when the stages split the layers into equal segments.

    Raises:
        ValueError: naming ``budget`` when the first stage would keep more than every token.
    """
    share = check_real(share, "budget", low=0.0, high=1.0, low_open=True)
    stages = check_int(stages, "stages", low=1, high=3)
    ref = sizes(OFFICIAL_SCHEDULE)[:stages + 1]
    scale = share * len(ref) / sum(ref)
    if ref[0] * scale > 1.0:
        raise ValueError(f"budget: a share of {share} puts {ref[0] * scale:.3f} of the tokens into the first stage; "
                         f"at most {sum(ref) / (len(ref) * ref[0]):.3f} with {stages} LLM stages")
    out, prev = [], 1.0
    for (_, c_ref), s_ref in zip(OFFICIAL_SCHEDULE, ref):
        size = s_ref * scale  # share of the encoder tokens
        keep, contextual = size / prev, size / prev * c_ref / s_ref
        out.append((keep - contextual, contextual))
        prev = size
    return tuple(out)


def sizes(schedule: Sequence[tuple[Any, Any]]) -> tuple:
    """``d + c`` of every stage."""
    return tuple(d + c for d, c in schedule)


def check_schedule(schedule: Any, stages: int) -> tuple[tuple[int, int], ...] | tuple[tuple[float, float], ...]:
    """A schedule as a tuple of ``stages`` pairs: all counts (ints, ``d >= 1``, ``c >= 0``, sizes non-increasing) or
    all fractions (reals, ``0 < d``, ``0 <= c``, ``d + c <= 1``). Raises naming ``schedule``."""
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise ValueError(f"schedule: expected a sequence of (dominant, contextual) pairs, got {schedule!r}")
    if len(schedule) != stages:
        raise ValueError(f"schedule: {len(schedule)} pairs for {stages} stages (stage 0 in the vision encoder, then "
                         "one per llm_layers entry)")
    pairs, kinds = [], set()
    for k, pair in enumerate(schedule):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"schedule[{k}]: expected a (dominant, contextual) pair, got {pair!r}")
        counts = all(isinstance(v, (numbers.Integral, np.integer)) for v in pair)  # bools fail check_int below
        if counts:
            pairs.append((check_int(pair[0], f"schedule[{k}] dominant", low=1),
                          check_int(pair[1], f"schedule[{k}] contextual", low=0)))
        else:
            d = check_real(pair[0], f"schedule[{k}] dominant", low=0.0, high=1.0, low_open=True)
            c = check_real(pair[1], f"schedule[{k}] contextual", low=0.0, high=1.0)
            if d + c > 1.0 + 1e-12:
                raise ValueError(f"schedule[{k}]: fractions {d} + {c} exceed 1")
            pairs.append((d, c))
        kinds.add(counts)
    if len(kinds) > 1:
        raise ValueError("schedule: use counts (ints) for every stage or fractions (floats) for every stage")
    if kinds == {True}:
        s = sizes(pairs)
        if any(b > a for a, b in zip(s, s[1:])):
            raise ValueError(f"schedule: stage sizes {list(s)} must not increase")
    return tuple(pairs)


def stage_counts(schedule, k: int, n: int, *, absolute: bool = False, name: str = "schedule") -> tuple[int, int]:
    """``(d, c)`` at stage ``k`` for ``n`` candidate tokens (see the module docstring).

    Raises:
        ValueError: naming ``name`` when the stage would keep more tokens than ``n``.
    """
    d, c = schedule[k]
    if isinstance(d, float):  # fractions of the tokens the stage receives
        d, c = keep_count(n, d, name=name), _half_up_share(n, c)
    elif k > 0 and not absolute:  # counts of the reference image, scaled to this image's tokens
        prev = sum(schedule[k - 1])
        d, c = keep_count(n, d / prev, name=name), _half_up_share(n, c / prev)
    elif d + c > n:
        raise ValueError(f"{name}: stage {k} keeps {d} dominant + {c} contextual tokens, but the image holds "
                         f"only {n} there")
    return d, min(c, n - d)
