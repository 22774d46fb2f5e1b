"""Window-Diffusion's scheduler: refresh steps, the window, the far field and the sliding active set (LLaDA path).

Paper: Zuo et al., "Window-Diffusion: Accelerating Diffusion Language Model Inference with Windowed Token Pruning and
Caching", arXiv 2601.20332. Compared against vhicrgit/Window-Diffusion at d8bb349 (``llada/model/modeling_llada.py``:
``generate``, ``build_window_plan``, ``update_window_plan``); nothing was copied. Defaults: the official LLaDA
evaluation scripts (window 64, active 16, refresh cycle 32; steps = generation length, temperature 0).

With r(i) the 0-based rank of masked position i among the masks from the left:

- A **refresh step** (every ``refresh_cycle`` steps) runs the model over the sequence (``refresh_scope="global"``: all
  of it, as the LLaDA release; ``"window"``: only up to the window's last position, as the Dream release, so a far
  field lying after it is never computed), records every layer's post-RoPE K/V (:mod:`.window`), and decodes n_t tokens
  (``refresh_decode="confidence"``: the most confident masks, LLaDA's rule; ``"leftmost"``: the leftmost masks, as
  the Dream release). It then fixes the phase's window W = the prompt, every decoded token and the masks with
  r(i) < ``window_tokens``; the other masks are the far field, neither queries nor keys until the next refresh.
- A **pruned step** computes only the active set A = the masks with r(i) < ``active_tokens``, the tokens decoded by
  this phase's pruned steps (kept active until the next refresh: the "post-decode transient") and, at the phase's
  first pruned step, the refresh's own decodes; A attends to W, whose other rows (the buffer) are read from the cache,
  stale since the refresh. It decodes n_t tokens among the masks of A by the sampler's confidence.

A mask can enter A without being in W when a phase decodes more than ``window_tokens - active_tokens`` tokens (the
release never checks): ``on_overflow="refresh"`` (default) makes that step a refresh, ``"error"`` raises.
Classifier-free guidance is not offered: the release's pruned path cannot run it (it indexes a full-length prompt
mask into the active subset).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunelab.common.validate import check_choice, check_int
from prunelab.methods.window_diffusion.model import DiffusionLM
from prunelab.methods.window_diffusion.samplers import (
    ACTIVE,
    BUFFER,
    FAR,
    Generation,
    _check,
    num_transfer_tokens,
    pick,
    start_sequences,
    stop_at_eos,
)
from prunelab.methods.window_diffusion.window import WindowCache, pad_indices, partial_forward, refresh_forward

SCOPES, DECODES, OVERFLOWS = ("global", "window"), ("confidence", "leftmost"), ("refresh", "error")

__all__ = ["WindowDiffusion", "window_generate", "SCOPES", "DECODES", "OVERFLOWS"]


@dataclass(frozen=True)
class WindowDiffusion:
    """Window-Diffusion's hyperparameters (module docstring); defaults: the official LLaDA evaluation scripts.

    Attributes:
        window_tokens: w, the masks inside the window (buffer + active) after a refresh.
        active_tokens: a, the leftmost masks computed at every pruned step (a <= w).
        refresh_cycle: R, steps per phase (a refresh, then R - 1 pruned steps); 1 makes every step a refresh.
        refresh_scope: ``"global"`` or ``"window"``.
        refresh_decode: ``"confidence"`` or ``"leftmost"``.
        on_overflow: ``"refresh"`` or ``"error"``, when A would leave W.
    """

    window_tokens: int = 64
    active_tokens: int = 16
    refresh_cycle: int = 32
    refresh_scope: str = "global"
    refresh_decode: str = "confidence"
    on_overflow: str = "refresh"

    def __post_init__(self):
        for name in ("window_tokens", "active_tokens", "refresh_cycle"):
            object.__setattr__(self, name, check_int(getattr(self, name), name, low=1))
        if self.active_tokens > self.window_tokens:
            raise ValueError(f"active_tokens: {self.active_tokens} exceeds window_tokens {self.window_tokens}")
        check_choice(self.refresh_scope, "refresh_scope", SCOPES)
        check_choice(self.refresh_decode, "refresh_decode", DECODES)
        check_choice(self.on_overflow, "on_overflow", OVERFLOWS)

    @classmethod
    def for_model(cls, model: DiffusionLM, **settings):
        """The settings object for ``model``'s family (:func:`~.sampler.method_for`: a Dream model gets
        :class:`~.dream_window.DreamWindow`)."""
        from prunelab.methods.window_diffusion.sampler import method_for

        return method_for(model, **settings)


def _mask_rank(masked: torch.Tensor) -> torch.Tensor:
    """[B, N] 0-based rank of each masked position among the masks from the left (large elsewhere)."""
    return (masked.long().cumsum(1) - 1).masked_fill(~masked, torch.iinfo(torch.long).max)


def _rows(selected: torch.Tensor) -> torch.Tensor:
    """[B, N] bool with the same count per row -> [B, count] ascending positions."""
    count = int(selected[0].sum())
    n = selected.shape[1]
    pos = torch.arange(n, device=selected.device).expand_as(selected)
    return torch.sort(torch.where(selected, pos, n), dim=1).values[:, :count]


@torch.no_grad()
def window_generate(model: DiffusionLM, prompts, gen_length: int, method: WindowDiffusion | None = None,
                    steps: int | None = None, *, temperature: float = 0.0, remasking: str = "low_confidence",
                    pad_id: int | None = None, generator: torch.Generator | None = None,
                    early_stop: bool = False, trace: bool = False, progress: bool = False) -> Generation:
    """LLaDA's sampler (:func:`~.samplers.llada_generate`, same arguments) with Window-Diffusion's schedule.

    Returns a :class:`~.samplers.Generation` whose ``log`` holds, per step, ``(kind, queries, keys)``: "refresh" or
    "pruned", the tokens computed per row and the keys each attends to (the mean over rows); with ``trace`` its
    ``partition`` holds each step's map of computed, cached and far-field positions. ``early_stop`` ends the loop
    once every row's answer is settled (:func:`~.samplers.stop_at_eos`; the LLaDA release runs every step).
    """
    method = method or WindowDiffusion()
    if model.shift_logits:
        raise ValueError("model: shifted (Dream) logits need a contiguous window: use dream_window_generate; "
                         "window_generate runs LLaDA-style models")
    steps = gen_length if steps is None else steps
    _check(model, gen_length, steps, temperature, remasking)
    ids, real, P, decoded_at = start_sequences(model, prompts, gen_length, pad_id)
    N, device = ids.shape[1], ids.device
    schedule = num_transfer_tokens(gen_length, steps)
    cache = WindowCache(model.config)
    phase, window, transient, fresh = 0, None, None, None
    w_idx = w_valid = None  # the phase's window as padded indices, fixed at its refresh
    log, partition = [], []
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc="Window-Diffusion", disable=not progress):
        masked = ids == model.mask_id
        refresh = phase == 0
        if not refresh:
            active = (_mask_rank(masked) < method.active_tokens) | transient | fresh
            if bool((active & ~window).any()):
                if method.on_overflow == "error":
                    raise RuntimeError(f"on_overflow: at step {step} a mask entered the active set outside the "
                                       f"window (window_tokens={method.window_tokens}, active_tokens="
                                       f"{method.active_tokens}, refresh_cycle={method.refresh_cycle})")
                refresh = True
        if refresh:
            end = N
            if method.refresh_scope == "window":  # the prefix holding the prompt, the decoded and the first w masks
                inside = ~masked | (_mask_rank(masked) < method.window_tokens)
                end = int(torch.where(inside, torch.arange(N, device=device) + 1, 0).max())
            logits = refresh_forward(model, ids[:, :end], real[:, :end], cache)
            x0, cols = pick(logits, masked[:, :end], schedule[step], temperature, remasking, generator,
                             leftmost=method.refresh_decode == "leftmost")
            log.append(("refresh", end, float(end)))
            if trace:
                codes = torch.full_like(ids, FAR, dtype=torch.uint8)
                codes[:, :end] = torch.where(real[:, :end].bool(), ACTIVE, FAR).to(torch.uint8)
                partition.append(codes)
            chosen = cols
        else:
            a_idx = _rows(active)
            logits = partial_forward(model, ids, real, cache, a_idx, w_idx, w_valid)
            x0, cols = pick(logits, masked.gather(1, a_idx), schedule[step], temperature, remasking, generator)
            log.append(("pruned", a_idx.shape[1], float(w_valid.sum(1).float().mean())))
            if trace:
                codes = torch.where(window, BUFFER, FAR).to(torch.uint8).scatter_(1, a_idx, ACTIVE)
                partition.append(codes)
            chosen = a_idx.gather(1, cols)
        ids = ids.scatter(1, chosen, x0.gather(1, cols))
        decoded_at.scatter_(1, chosen - P, step)
        newly = torch.zeros_like(masked).scatter_(1, chosen, True)
        if refresh:
            now = ids == model.mask_id
            window = (real.bool() & ~now) | (_mask_rank(now) < method.window_tokens)
            window[:, end:] = False  # under refresh_scope="window" the cache holds the computed prefix only
            w_idx, w_valid = pad_indices([torch.nonzero(row).flatten() for row in window])
            transient, fresh = torch.zeros_like(masked), newly
        else:
            transient, fresh = transient | newly, torch.zeros_like(masked)
        phase = ((0 if refresh else phase) + 1) % method.refresh_cycle
        if early_stop and stop_at_eos(model, ids, P, decoded_at, step):
            break
    return Generation(ids, real, P, decoded_at, forward_tokens=sum(q for _, q, _ in log), log=log,
                      partition=partition)
