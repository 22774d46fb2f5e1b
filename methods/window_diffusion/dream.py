"""Dream's sampler in the form Window-Diffusion accelerates: the leftmost mask each step, shifted logits, an EOS stop.

Papers: Ye et al., "Dream 7B" (2025), the diffusion LM; Window-Diffusion (Zuo et al., arXiv 2601.20332), whose Dream
path is this loop with a window. Compared against vhicrgit/Window-Diffusion at d8bb349
(``dream/model/generation_utils.py``: ``sample_tokens``, ``top_p_logits``, ``top_k_logits``, ``apply_eos_fill_`` and
the full steps of ``nearest_sample_fast_v2_cache``); nothing was copied.

Each step runs the model over the prompt, the decoded answer and the leftmost ``window_tokens`` masks (all of them
when None; the rest, the far field, is not computed), reads Dream's right-shifted logits (position i predicted from
the hidden state at i - 1) and decodes the **leftmost** mask: argmax at temperature 0, else a draw from the tempered,
top-p / top-k filtered distribution. ``confidence`` (the release's ``alg``: negative entropy, the top probability or
the top-two margin) is what a windowed step ranks its masks by; this loop, one leftmost token per step, reports it
but does not need it. With ``early_stop``, a row whose answer holds an EOS stops there: every later position becomes
EOS (no mask remains after the first EOS) and the row is not computed again.

What differs from the release: batches (left-padded, finished rows dropped from the forward) instead of batch 1;
``window_tokens`` counts the masks kept (the release's ``o_win_size`` keeps ``o_win_size - 1``: it compares a
1-based rank with ``<``); the EOS id is the model's, not the hard-coded 151643.
"""

from __future__ import annotations

import torch

from prunelab.methods.window_diffusion.model import DiffusionLM
from prunelab.methods.window_diffusion.samplers import Generation, start_sequences

CONFIDENCES = ("entropy", "maskgit_plus", "topk_margin")

__all__ = ["CONFIDENCES", "filter_logits", "sample_tokens", "dream_generate"]


def filter_logits(logits: torch.Tensor, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None) -> torch.Tensor:
    """Dream's filtering: divide by the temperature (if > 0), keep the smallest set of tokens whose probability
    reaches ``top_p`` (the first always kept), then the ``top_k`` largest; the rest get the dtype's minimum."""
    if temperature > 0:
        logits = logits / temperature
    low = torch.finfo(logits.dtype).min
    if top_p is not None and top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        beyond = torch.softmax(ordered, dim=-1).cumsum(-1) > top_p
        beyond = torch.cat([torch.zeros_like(beyond[..., :1]), beyond[..., :-1]], dim=-1)
        logits = logits.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), low)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, low)
    return logits


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None, confidence: str = "entropy",
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [...] and their confidence [...] from logits [..., V] (Dream's ``sample_tokens``): the argmax at
    temperature 0, else a draw; confidence ``"entropy"`` (sum p log p, the negative entropy), ``"maskgit_plus"``
    (the chosen token's probability) or ``"topk_margin"`` (top-1 minus top-2 probability)."""
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence: expected one of {CONFIDENCES}, got {confidence!r}")
    probs = torch.softmax(filter_logits(logits.float(), temperature, top_p, top_k), dim=-1)
    if temperature > 0:
        flat = probs.reshape(-1, probs.shape[-1])
        x0 = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
        top = probs.gather(-1, x0[..., None]).squeeze(-1)
    else:
        top, x0 = probs.max(dim=-1)
    if confidence == "entropy":
        score = (probs * torch.log(probs + 1e-10)).sum(-1)
    elif confidence == "topk_margin":
        two = torch.topk(probs, 2, dim=-1).values
        score = two[..., 0] - two[..., 1]
    else:
        score = top
    return score, x0


@torch.no_grad()
def dream_generate(model: DiffusionLM, prompts, max_new_tokens: int, *, window_tokens: int | None = None,
                   temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                   early_stop: bool = False, pad_id: int | None = None, generator: torch.Generator | None = None,
                   progress: bool = False) -> Generation:
    """Dream's leftmost-mask loop (module docstring): one token per step, ``max_new_tokens`` steps at most."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if window_tokens is not None and (isinstance(window_tokens, bool) or not isinstance(window_tokens, int)
                                      or window_tokens < 1):
        raise ValueError(f"window_tokens: expected None or an int >= 1, got {window_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature!r}")
    if early_stop and model.eos_id is None:
        raise ValueError("early_stop: the model has no eos_id")
    G = max_new_tokens
    ids, real, P, decoded_at = start_sequences(model, prompts, G, pad_id)
    B, device = ids.shape[0], ids.device
    running = torch.ones(B, dtype=torch.bool, device=device)
    log = []
    from tqdm.auto import tqdm

    for step in tqdm(range(G), desc="Dream sampling", disable=not progress):
        rows = torch.nonzero(running).flatten()
        if rows.numel() == 0:
            break
        # every running row has decoded `step` tokens: the leftmost mask sits at P + step in each
        end = P + G if window_tokens is None else min(P + G, P + step + window_tokens)
        logits = model(ids[rows, :end], real[rows, :end])[:, P + step]
        _, x0 = sample_tokens(logits, temperature, top_p, top_k, generator=generator)
        ids[rows, P + step] = x0
        decoded_at[rows, step] = step
        real_tokens = real[rows, :end].sum(1).double()  # each running row's real tokens, every one a key
        log.append(("full", float(real_tokens.sum()) / B, float((real_tokens ** 2).sum() / real_tokens.sum())))
        if early_stop:
            ended = rows[x0 == model.eos_id]
            ids[ended, P + step + 1:] = model.eos_id
            running[ended] = False
    return Generation(ids, real, P, decoded_at, forward_tokens=sum(q for _, q, _ in log), log=log)
