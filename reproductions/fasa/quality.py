"""Decode-step quality against dense: perplexity and next-token agreement under teacher forcing.

FASA changes only decode steps (prefill is dense), so quality is measured where it acts: each held-out window
is prefilled densely on its first ``prefix`` tokens, then its next ``steps`` tokens are fed one decode step at a
time through the method, with the true token as input (teacher forcing). We record the negative log-likelihood
of each true next token and whether the method's arg-max equals the dense model's, and the KL divergence
``KL(dense || method)`` of the next-token distributions.
"""

from __future__ import annotations

import copy

import torch

import prunelab
from prunelab.methods.baselines import DenseDecode


@torch.no_grad()
def _prefill(model, ids: torch.Tensor):
    with prunelab.apply(model, DenseDecode()):
        out = model(ids[None], use_cache=True)
    return out.past_key_values, out.logits[0, -1]


@torch.no_grad()
def _decode(model, method, cache, first_logits, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[steps, V]`` predicting ``tokens[1:]`` after feeding ``tokens[:-1]`` one by one."""
    logps = [torch.log_softmax(first_logits.float(), -1)]
    with prunelab.apply(model, method):
        for tok in tokens[:-1]:
            out = model(tok.view(1, 1), past_key_values=cache, use_cache=True)
            logps.append(torch.log_softmax(out.logits[0, -1].float(), -1))
    return torch.stack(logps)


def decode_quality(model, windows: torch.Tensor, prefix: int, methods: dict, progress: bool = True) -> dict:
    """Per method: ``ppl``, ``agreement`` (top-1 equal to dense) and ``kl`` over every decode step.

    Args:
        model: a decoder supported by ``prunelab.apply``.
        windows: int64 ``[n, prefix + steps]`` held-out token ids.
        prefix: tokens prefilled densely before the measured decode steps.
        methods: name -> decoder method; ``"dense"`` is added as the reference.
    """
    from tqdm.auto import tqdm

    stats = {name: {"nll": [], "agree": [], "kl": []} for name in ["dense", *methods]}
    for w in tqdm(windows, desc="held-out windows", disable=not progress):
        cache, first = _prefill(model, w[:prefix])
        targets = w[prefix:]
        dense = _decode(model, DenseDecode(), copy.deepcopy(cache), first, targets)
        for name, method in [("dense", None), *methods.items()]:
            lp = dense if method is None else _decode(model, method, copy.deepcopy(cache), first, targets)
            s = stats[name]
            s["nll"].append(-lp.gather(1, targets[:, None])[:, 0])
            s["agree"].append((lp.argmax(-1) == dense.argmax(-1)).float())
            s["kl"].append((dense.exp() * (dense - lp)).sum(-1))
    result = {}
    for name, s in stats.items():
        nll, agree, kl = (torch.cat(s[k]) for k in ("nll", "agree", "kl"))
        result[name] = {"ppl": float(nll.mean().exp()), "agreement": float(agree.mean()), "kl": float(kl.mean()),
                        "steps": int(nll.numel())}
    return result
