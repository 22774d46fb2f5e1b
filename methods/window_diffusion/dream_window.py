"""Window-Diffusion's Dream path: a refreshed prefix, a contiguous inner window, Dream's step schedule.

Paper: Zuo et al., "Window-Diffusion: Accelerating Diffusion Language Model Inference with Windowed Token Pruning and
Caching", arXiv 2601.20332. Compared against vhicrgit/Window-Diffusion at d8bb349
(``dream/model/generation_utils.py``, ``nearest_sample_fast_v2_cache``); nothing was copied. Defaults: the official
Dream-Base evaluation scripts (outer window 128, inner window 16, refresh cycle 32, ``slide_window``).

With the masks ranked 1, 2, ... from the left:

- A **refresh step** (every ``refresh_cycle`` steps) computes the prefix holding the prompt, the decoded tokens and
  the first ``window_tokens`` masks (the far field after it is never computed), records every layer's K/V for it and
  decodes the **leftmost** mask. The inner window starts at that mask and ends after the ``active_tokens``-th mask
  (counted before the decode). The prefix's length is the release's count of the tokens it keeps (every token but
  the masks after the ``window_tokens``-th): once no more than ``window_tokens`` masks remain, the whole sequence
  (up to the EOS, after an ``early_stop``); each kept token after the ``window_tokens``-th mask (the EOS after a stop)
  lengthens it by one position.
- A **pruned step** computes the inner window [start, end) only (its end moving right with the masks it decodes
  under ``slide_window``; its start fixed until the next refresh), attends to the cached prefix and itself, reads
  Dream's shifted logits inside the window (the window's first position keeps its own logit: the token before it is
  not computed) and decodes the window's most confident masks by ``confidence`` (the release always uses negative
  entropy, whatever ``alg`` says; here ``confidence`` is honoured, ``"entropy"`` gives the release's choice).
  How many: Dream's schedule, ``int(m (1 - s / t))`` of the m masks left with t, s consecutive points of
  ``linspace(1, eps, steps + 1)`` (all of them at the last step); with ``early_stop``, one.
- ``early_stop``: after each pruned step, a row whose answer holds an EOS (decoded by this step, or by the phase's
  refresh) stops at its first EOS: every later position becomes EOS (``decoded_at`` -1 there) and every later step
  of that row is a refresh, decoding the masks left before the EOS leftmost first, as the release does after it
  truncates at its first EOS. A row without masks is done and no longer computed.

Batches (left-padded): every row runs the schedule it runs alone. Without ``early_stop`` all rows decode the same
count per step and are in the same kind of step (the windows are ragged and padded). With it, rows stop at different
steps: a row without masks leaves the batch (its cache rows are dropped, it is not computed again), and a row that
has stopped refreshes while the others may be in a pruned step; such a step runs as two sub-batches, the refresh
rows and the pruned rows, each on a copy of its own cache rows, written back after the forward. At temperature 0
each row equals its single run; sampling draws in another order.

``Generation.log`` has one entry ``(kind, queries, keys)`` per step and kind of forward (two at a split step):
``queries`` is the real tokens computed, summed over the rows and divided by the batch size, ``keys`` the keys per
computed query (the query-weighted mean over rows). So :func:`~.flops.run_macs` is the mean per row, and the batch
size times it the batch's total, the sum of its rows' single runs; padding is not counted.

What differs from the release: batches; ``window_tokens`` counts the masks kept (the release's ``o_win_size`` keeps
one fewer, its 1-based rank compared with ``<``); the EOS id is the model's and is looked for in the answer only (the
release scans the prompt too).
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


def _rows_cache(cache: WindowCache, rows: torch.Tensor, config, fresh: bool) -> WindowCache:
    """The cache a forward of the cache rows ``rows`` runs on: ``cache`` itself when they are all its rows, else a
    cache of them (a copy; empty for a refresh, ``fresh``, which records them anew)."""
    if not cache.keys or rows.numel() == next(iter(cache.keys.values())).shape[0]:
        return cache
    sub = WindowCache(config, capacity=cache.capacity)
    if not fresh:
        sub.keys = {i: k[rows] for i, k in cache.keys.items()}
        sub.values = {i: v[rows] for i, v in cache.values.items()}
    return sub


def _write_rows(cache: WindowCache, sub: WindowCache, rows: torch.Tensor) -> None:
    """Write a sub-batch's cache back into the cache rows ``rows`` (nothing when it ran on the whole cache)."""
    if sub is cache:
        return
    for store, part in ((cache.keys, sub.keys), (cache.values, sub.values)):
        for i, t in part.items():
            store[i].index_copy_(0, rows, t.to(store[i].dtype))


def _entry(kind: str, queries: torch.Tensor, keys: torch.Tensor, batch: int) -> tuple:
    """A log entry of a forward over some rows: real queries summed over them per batch row, keys per query."""
    total, weighted = int(queries.sum()), float((queries * keys).sum())
    return kind, total // batch if total % batch == 0 else total / batch, weighted / total if total else 0.0


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
    if early_stop and model.eos_id is None:
        raise ValueError("early_stop: the model has no eos_id")
    ids, real, P, decoded_at = start_sequences(model, prompts, G, pad_id)
    (B, N), device = ids.shape, ids.device
    pos, answer_pos = torch.arange(N, device=device), torch.arange(G, device=device)
    cache = WindowCache(model.config, capacity=N)
    # per row: the inner window [start, window_end), the refreshed prefix's end, where the sequence stops (after the
    # first EOS once the row has stopped, else N) and whether it has stopped
    start, window_end, prefix = (torch.zeros(B, dtype=torch.long, device=device) for _ in range(3))
    stop = torch.full((B,), N, dtype=torch.long, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    held = torch.arange(B, device=device)  # the rows the cache holds, in its order: a finished row leaves it
    slot = held.clone()  # each held row's index in the cache
    log = []
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc="Window-Diffusion (Dream)", disable=not progress):
        masked = (ids == model.mask_id) & real.bool()
        live = masked.any(1)
        if not bool(live.any()):
            break
        if int(live.sum()) < held.numel():  # rows without masks are done: they leave the batch and the cache
            keep = live[held]
            held = held[keep]
            for store in (cache.keys, cache.values):
                for i in store:
                    store[i] = store[i][keep]
            slot[held] = torch.arange(held.numel(), device=device)
        refresh = live & (ended | (step % method.refresh_cycle == 0))
        if bool(refresh.any()):
            rows = torch.nonzero(refresh).flatten()
            m = masked[rows]
            kept = ((pos < stop[rows, None]) & ~m).sum(1) + m.sum(1).clamp(max=method.window_tokens)
            prefix[rows] = kept  # the release's count of kept tokens, used as a length
            end = int(kept.max())
            keys = real[rows, :end] * (pos[:end] < kept[:, None]).long()
            sub = _rows_cache(cache, slot[rows], model.config, fresh=True)
            logits = refresh_forward(model, ids[rows, :end], keys, sub)
            _write_rows(cache, sub, slot[rows])
            first = m.long().argmax(1)  # the leftmost mask, decoded now
            start[rows], window_end[rows] = first, _nth_mask_end(m, method.active_tokens)  # counted before the decode
            shifted = logits[torch.arange(rows.numel(), device=device), first - 1]  # Dream's shift
            _, x0 = sample_tokens(shifted, temperature, top_p, top_k, method.confidence, generator)
            ids[rows, first], decoded_at[rows, first - P] = x0, step
            q = keys.sum(1)
            log.append(_entry("refresh", q, q, B))
        rows = torch.nonzero(live & ~refresh).flatten()
        if rows.numel() == 0:
            continue
        m, s = masked[rows], start[rows]
        if method.slide_window:
            window_end[rows] = torch.maximum(_nth_mask_end(m, method.active_tokens), s + 1)
        e = window_end[rows]
        active, _ = pad_indices([torch.arange(a, b, device=device) for a, b in zip(s.tolist(), e.tolist())])
        width = torch.maximum(prefix[rows], e)
        window, valid = pad_indices([torch.nonzero(real[b, :w]).flatten() for b, w in zip(rows.tolist(),
                                                                                          width.tolist())])
        sub = _rows_cache(cache, slot[rows], model.config, fresh=False)
        logits = partial_forward(model, ids[rows], real[rows], sub, active, window, valid)
        _write_rows(cache, sub, slot[rows])
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # shifted inside the window
        score, x0 = sample_tokens(logits, temperature, top_p, top_k, method.confidence, generator)
        inside = (active < e[:, None]) & m.gather(1, active)
        want = [1 if early_stop else dream_schedule(k, step, steps, method.eps) for k in m.sum(1).tolist()]
        count = torch.minimum(torch.tensor(want, device=device), inside.sum(1))
        log.append(_entry("pruned", e - s, valid.sum(1), B))
        most = int(count.max())
        if most > 0:
            cols = torch.sort(torch.where(inside, score, float("-inf")), dim=1, descending=True,
                              stable=True).indices[:, :most]
            take = torch.arange(most, device=device) < count[:, None]
            r, chosen = rows[:, None].expand(-1, most)[take], active.gather(1, cols)[take]
            ids[r, chosen], decoded_at[r, chosen - P] = x0.gather(1, cols)[take], step
        if early_stop:  # after every pruned step, as the release
            answer = ids[rows, P:]
            eos = answer == model.eos_id
            has = eos.any(1)
            if bool(has.any()):
                first = eos.long().argmax(1)
                after = has[:, None] & (answer_pos > first[:, None])
                ids[rows, P:] = answer.masked_fill(after, model.eos_id)
                decoded_at[rows] = decoded_at[rows].masked_fill(after, -1)
                stop[rows] = torch.where(has, P + first + 1, stop[rows])
                ended[rows] |= has
    return Generation(ids, real, P, decoded_at, forward_tokens=sum(q for _, q, _ in log), log=log)
