"""Window-Diffusion's Dream path: a refreshed prefix, a contiguous inner window, Dream's step schedule.

Paper: Zuo et al., "Window-Diffusion: Accelerating Diffusion Language Model Inference with Windowed Token Pruning and
Caching", arXiv 2601.20332. Compared against vhicrgit/Window-Diffusion at d8bb349
(``dream/model/generation_utils.py``, ``nearest_sample_fast_v2_cache``); nothing was copied. Defaults: the official
Dream-Base evaluation scripts (outer window 128, inner window 16, refresh cycle 32, ``slide_window``).

With the masks ranked 1, 2, ... from the left:

- A **refresh step** (every ``refresh_cycle`` steps) computes the prefix holding the prompt, the decoded tokens and
  the first ``window_tokens`` masks (the far field after it is never computed), records every layer's K/V for it and
  decodes the **leftmost** mask. The inner window starts at that mask and ends after the ``active_tokens``-th mask
  (counted before the decode).
- A **pruned step** computes the inner window [start, end) only (its end moving right with the masks it decodes
  under ``slide_window``; its start fixed until the next refresh), attends to the cached prefix and itself, reads
  Dream's shifted logits inside the window (the window's first position keeps its own logit: the token before it is
  not computed) and decodes the window's most confident masks by ``confidence`` (the release always uses negative
  entropy, whatever ``alg`` says; here ``confidence`` is honoured, ``"entropy"`` gives the release's choice).
  How many: Dream's schedule, ``int(m (1 - s / t))`` of the m masks left with t, s consecutive points of
  ``linspace(1, eps, steps + 1)`` (all of them at the last step); with ``early_stop``, one.
- ``early_stop``: a pruned step that decodes an EOS ends the answer there (every later position EOS) and every later
  step is a refresh, as the release does after its first EOS.

What differs from the release: batches (left-padded; every row decodes the same count per step, the windows are
ragged and padded) except with ``early_stop``, which mixes refresh and pruned rows and runs at batch 1 only for now;
``window_tokens`` counts the masks kept (the release's ``o_win_size`` keeps one fewer, its 1-based rank compared with
``<``); the EOS id is the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.validate import check_choice, check_int
from prunelab.methods.window_diffusion.dream import CONFIDENCES, sample_tokens
from prunelab.methods.window_diffusion.model import DiffusionLM
from prunelab.methods.window_diffusion.samplers import Generation, start_sequences
from prunelab.methods.window_diffusion.window import WindowCache, pad_indices, partial_forward, refresh_forward

__all__ = ["DreamWindow", "dream_schedule", "dream_window_generate"]


@dataclass(frozen=True)
class DreamWindow:
    """The Dream path's hyperparameters (module docstring); defaults: the official Dream-Base evaluation scripts.

    Attributes:
        window_tokens: masks in the refreshed prefix (the release's ``o_win_size`` minus one).
        active_tokens: masks in the inner window (``i_win_size``).
        refresh_cycle: steps per phase.
        slide_window: move the inner window's end with the decoded masks.
        confidence: ``"entropy"`` (the release), ``"maskgit_plus"`` or ``"topk_margin"``.
        eps: the end of Dream's time grid.
    """

    window_tokens: int = 128
    active_tokens: int = 16
    refresh_cycle: int = 32
    slide_window: bool = True
    confidence: str = "entropy"
    eps: float = 1e-3

    def __post_init__(self):
        for name in ("window_tokens", "active_tokens", "refresh_cycle"):
            object.__setattr__(self, name, check_int(getattr(self, name), name, low=1))
        check_choice(self.confidence, "confidence", CONFIDENCES)
        if not 0 < self.eps < 1:
            raise ValueError(f"eps: expected a value in (0, 1), got {self.eps!r}")


def dream_schedule(masks_left: int, step: int, steps: int, eps: float = 1e-3) -> int:
    """Dream's tokens to decode at ``step``: ``int(m (1 - s / t))`` over ``linspace(1, eps, steps + 1)``, all at the
    last step."""
    if step >= steps - 1:
        return masks_left
    t = 1 - step * (1 - eps) / steps
    s = 1 - (step + 1) * (1 - eps) / steps
    return int(masks_left * (1 - s / t))


def _nth_mask_end(masked: torch.Tensor, n: int) -> torch.Tensor:
    """[B] the position after the n-th mask of each row (after the last mask if a row has fewer)."""
    rank = masked.long().cumsum(1)
    pos = torch.arange(masked.shape[1], device=masked.device) + 1
    return torch.where(masked & (rank <= n), pos, 0).max(1).values


@torch.no_grad()
def dream_window_generate(model: DiffusionLM, prompts, max_new_tokens: int, method: DreamWindow | None = None,
                          steps: int | None = None, *, temperature: float = 0.0, top_p: float | None = None,
                          top_k: int | None = None, early_stop: bool = False, pad_id: int | None = None,
                          generator: torch.Generator | None = None, progress: bool = False) -> Generation:
    """Dream's windowed sampler (module docstring); ``steps`` defaults to ``max_new_tokens``."""
    method = method or DreamWindow()
    G = check_int(max_new_tokens, "max_new_tokens", low=1)
    steps = G if steps is None else check_int(steps, "steps", low=1)
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature!r}")
    if not model.shift_logits:
        raise ValueError("model: the Dream path reads shifted logits (a DiffusionLM with shift_logits=True)")
    if early_stop and (model.eos_id is None or len(prompts) != 1):
        raise NotImplementedError("early_stop: the windowed Dream path stops at EOS at batch 1 only for now (a batch "
                                  "would mix refresh and pruned rows), and needs the model's eos_id")
    ids, real, P, decoded_at = start_sequences(model, prompts, G, pad_id)
    (B, N), device = ids.shape, ids.device
    pos = torch.arange(N, device=device)
    cache = WindowCache(model.config, capacity=N)
    phase, ended, log = 0, False, []
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc="Window-Diffusion (Dream)", disable=not progress):
        masked = (ids == model.mask_id) & real.bool()
        if not bool(masked.any()):
            break
        if phase == 0 or ended:
            prefix = _nth_mask_end(masked, method.window_tokens)  # [B]; the far field lies after it
            end = int(prefix.max())
            keys = real[:, :end] * (pos[:end] < prefix[:, None]).long()
            logits = refresh_forward(model, ids[:, :end], keys, cache)
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # Dream's shift
            start = masked.long().argmax(1)  # the leftmost mask, decoded now
            window_end = _nth_mask_end(masked, method.active_tokens)  # counted before the decode, as the release
            _, x0 = sample_tokens(logits.gather(1, start[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0],
                                  temperature, top_p, top_k, method.confidence, generator)
            rows = torch.arange(B, device=device)
            ids[rows, start], decoded_at[rows, start - P] = x0, step
            log.append(("refresh", end, float(end)))
            phase = 1 % method.refresh_cycle
            continue
        if method.slide_window:
            window_end = torch.maximum(_nth_mask_end(masked, method.active_tokens), start + 1)
        active, _ = pad_indices([torch.arange(int(s), int(e), device=device) for s, e in zip(start, window_end)])
        width = torch.maximum(prefix, window_end)
        window, valid = pad_indices([torch.nonzero(real[b, :int(width[b])]).flatten() for b in range(B)])
        logits = partial_forward(model, ids, real, cache, active, window, valid)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # shifted inside the window
        score, x0 = sample_tokens(logits, temperature, top_p, top_k, method.confidence, generator)
        inside = (active < window_end[:, None]) & masked.gather(1, active)
        count = 1 if early_stop else dream_schedule(int(masked[0].sum()), step, steps, method.eps)
        count = min(count, int(inside.sum(1).min()))
        log.append(("pruned", active.shape[1], float(valid.sum(1).float().mean())))
        if count > 0:
            cols = torch.sort(torch.where(inside, score, float("-inf")), dim=1, descending=True,
                              stable=True).indices[:, :count]
            chosen = active.gather(1, cols)
            ids = ids.scatter(1, chosen, x0.gather(1, cols))
            decoded_at.scatter_(1, chosen - P, step)
            if early_stop and bool((x0.gather(1, cols) == model.eos_id).any()):
                first = int(torch.nonzero(ids[0, P:] == model.eos_id)[0])
                ids[0, P + first + 1:] = model.eos_id
                ended = True
        phase = (phase + 1) % method.refresh_cycle
    return Generation(ids, real, P, decoded_at, forward_tokens=sum(q for _, q, _ in log), log=log)
