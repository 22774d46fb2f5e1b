"""The vanilla sampler Window-Diffusion accelerates: LLaDA's single-block low-confidence remasking, batched.

Papers: Nie et al., "Large Language Diffusion Models" (LLaDA, arXiv 2502.09992), Algorithm 5 (low-confidence
remasking), as ``generate()`` in GSAI-ML/LLaDA's ``generate.py`` runs it with one block; Window-Diffusion (Zuo et al.,
arXiv 2601.20332) evaluates LLaDA with steps = generation length, temperature 0 and no classifier-free guidance.
Compared against vhicrgit/Window-Diffusion at d8bb349 (``llada/model/modeling_llada.py``: ``generate`` with every step
a full step, ``get_num_transfer_tokens``, ``add_gumbel_noise``); nothing was copied.

The answer starts as G mask tokens after the prompt. Step t (of ``steps``) runs the whole sequence, predicts
x0 = argmax of the logits at every position (with Gumbel noise in float64 when ``temperature > 0``), scores each
still-masked position by the softmax probability of its prediction (``remasking="low_confidence"``) or by a uniform
draw (``"random"``), and unmasks the n_t best; n_t splits G evenly over the steps, the remainder going to the first
steps. Ties go to the lower position (a stable sort; the official ``torch.topk`` leaves them unspecified).

Batches: prompts of different lengths are left-padded; padding is never attended and position ids count real tokens
(:class:`~.model.DiffusionLM`), so each row computes what it computes alone. Every row has the same G and schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from prunelab.methods.window_diffusion.model import DiffusionLM

REMASKING = ("low_confidence", "random")
FAR, BUFFER, ACTIVE = 0, 1, 2  # the codes of Generation.partition

__all__ = ["REMASKING", "FAR", "BUFFER", "ACTIVE", "Generation", "answer_complete", "stop_at_eos",
           "num_transfer_tokens", "pad_prompts", "start_sequences", "pick", "llada_generate", "add_gumbel_noise"]


@dataclass
class Generation:
    """A batch of generations.

    Attributes:
        ids: [B, P + G] the left-padded prompts followed by the answers.
        attention_mask: [B, P + G] 1 for real tokens.
        prompt_length: P, the padded prompt length (the answers are ``ids[:, P:]``).
        decoded_at: [B, G] the 0-based step at which each answer position was unmasked.
        forward_tokens: tokens the model computed per row, summed over the steps (the FLOPs' driver).
        log: per step ``(kind, queries, keys)``: "full" (vanilla), "refresh" or "pruned" (Window-Diffusion), the
            tokens computed per row and the keys each of them attends to (mean over rows).
        partition: with ``trace=True`` (Window-Diffusion's LLaDA path), per step a [B, N] uint8 map of what the step
            did at each position: :data:`FAR` (neither computed nor read), :data:`BUFFER` (read from the cache),
            :data:`ACTIVE` (computed).
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    decoded_at: torch.Tensor
    forward_tokens: int
    log: list = field(default_factory=list)
    partition: list = field(default_factory=list)

    @property
    def answer(self) -> torch.Tensor:
        """[B, G] the generated tokens."""
        return self.ids[:, self.prompt_length:]


def num_transfer_tokens(gen_length: int, steps: int) -> list[int]:
    """Tokens unmasked at each step: ``gen_length // steps``, plus one in the first ``gen_length % steps`` steps."""
    base, rest = divmod(gen_length, steps)
    return [base + (t < rest) for t in range(steps)]


def pad_prompts(prompts, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of 1-D prompts (token lists or tensors) to ``[B, P]`` ids and an attention mask."""
    rows = [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("prompts: expected a non-empty list of non-empty token sequences")
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
        mask[i, width - r.numel():] = 1
    return ids.to(device), mask.to(device)


def start_sequences(model: DiffusionLM, prompts, gen_length: int, pad_id: int | None = None):
    """The sequences a sampler starts from: left-padded prompts followed by ``gen_length`` masks.

    Returns ``(ids [B, P + G], attention_mask [B, P + G], P, decoded_at [B, G] of -1)``; ``pad_id`` None is the
    model's EOS id, else 0. Errors name ``pad_id`` or ``prompts`` when the mask token would be padding or a prompt
    token."""
    device = next(model.parameters()).device
    pad_id = (model.eos_id if model.eos_id is not None else 0) if pad_id is None else pad_id
    if pad_id == model.mask_id:
        raise ValueError(f"pad_id: {pad_id} is the mask token")
    prompt_ids, prompt_mask = pad_prompts(prompts, pad_id, device)
    if bool((prompt_ids[prompt_mask.bool()] == model.mask_id).any()):
        raise ValueError(f"prompts: contain the mask token {model.mask_id}")
    B, P = prompt_ids.shape
    ids = torch.cat([prompt_ids, torch.full((B, gen_length), model.mask_id, dtype=torch.long, device=device)], 1)
    mask = torch.cat([prompt_mask, torch.ones(B, gen_length, dtype=torch.long, device=device)], 1)
    return ids, mask, P, torch.full((B, gen_length), -1, dtype=torch.long, device=device)


def answer_complete(ids: torch.Tensor, prompt_length: int, mask_id: int, eos_id: int) -> torch.Tensor:
    """[B] bool: rows whose answer is settled, no mask left before its first EOS (or no mask at all)."""
    answer = ids[:, prompt_length:]
    G = answer.shape[1]
    first = [torch.where(hit.any(1), hit.long().argmax(1), G) for hit in (answer == eos_id, answer == mask_id)]
    return first[0] < first[1] if G else torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)


def stop_at_eos(model: DiffusionLM, ids: torch.Tensor, prompt_length: int, decoded_at: torch.Tensor, step: int):
    """The early stop at EOS (``early_stop=True``): when every row's answer is settled (:func:`answer_complete`),
    fill the masks left with EOS (recorded as decoded at ``step``) and return True. The answer up to the first EOS
    is what the run without the stop gives: a decoded token is never masked again."""
    if model.eos_id is None:
        raise ValueError("early_stop: the model has no eos_id")
    if not bool(answer_complete(ids, prompt_length, model.mask_id, model.eos_id).all()):
        return False
    masked = ids == model.mask_id
    decoded_at.masked_fill_(masked[:, prompt_length:], step)
    ids.masked_fill_(masked, model.eos_id)
    return True


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None):
    """LLaDA's Gumbel-max in float64: ``exp(logits) / (-log U)^temperature`` (argmax of it samples the tempered
    distribution); ``temperature == 0`` returns the logits."""
    if temperature == 0:
        return logits
    logits = logits.double()
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def pick(logits: torch.Tensor, candidates: torch.Tensor, count: int, temperature: float = 0.0,
         remasking: str = "low_confidence", generator: torch.Generator | None = None, leftmost: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode of LLaDA's sampler on logits [B, M, V]: the predictions x0 [B, M] and the ``count`` chosen columns
    [B, count] among ``candidates`` [B, M] (the still-masked ones): the most confident (``remasking``), or the
    leftmost; ties go to the lower column."""
    x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)
    if leftmost:
        score = -torch.arange(candidates.shape[1], device=logits.device, dtype=torch.float32).expand(candidates.shape)
    elif remasking == "low_confidence":
        score = torch.softmax(logits.float(), dim=-1).gather(-1, x0[..., None]).squeeze(-1)
    else:
        score = torch.rand(candidates.shape, device=logits.device, generator=generator)
    score = torch.where(candidates, score, float("-inf"))
    return x0, torch.sort(score, dim=1, descending=True, stable=True).indices[:, :count]


def _check(model, gen_length, steps, temperature, remasking):
    if not isinstance(model, DiffusionLM):
        raise TypeError(f"model: expected a DiffusionLM, got {type(model).__name__}")
    if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length < 1:
        raise ValueError(f"gen_length: expected an int >= 1, got {gen_length!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= gen_length:
        raise ValueError(f"steps: expected an int in [1, gen_length={gen_length}], got {steps!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature: expected >= 0, got {temperature!r}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking: expected one of {REMASKING}, got {remasking!r}")


@torch.no_grad()
def llada_generate(model: DiffusionLM, prompts, gen_length: int, steps: int | None = None, *,
                   temperature: float = 0.0, remasking: str = "low_confidence", pad_id: int | None = None,
                   generator: torch.Generator | None = None, early_stop: bool = False, progress: bool = False
                   ) -> Generation:
    """LLaDA's single-block sampler (module docstring).

    Args:
        model: the :class:`DiffusionLM`.
        prompts: a list of 1-D token sequences (lengths may differ), without mask tokens.
        gen_length: G, the answer length.
        steps: denoising steps in [1, G]; None: G (one token per step, Window-Diffusion's setting).
        temperature: 0 decodes greedily; > 0 samples with LLaDA's float64 Gumbel noise.
        remasking: ``"low_confidence"`` (the paper's) or ``"random"``.
        pad_id: the id of left padding (never attended); None: the model's EOS id, else 0.
        generator: the random source of ``temperature > 0`` and ``"random"``.
        early_stop: end the loop once every row's answer is settled (:func:`stop_at_eos`); LLaDA's release runs
            every step (the default). Measures what an early stop at EOS saves.
        progress: a tqdm bar over the steps.
    """
    steps = gen_length if steps is None else steps
    _check(model, gen_length, steps, temperature, remasking)
    ids, mask, P, decoded_at = start_sequences(model, prompts, gen_length, pad_id)
    schedule = num_transfer_tokens(gen_length, steps)
    from tqdm.auto import tqdm

    done = 0
    for step in tqdm(range(steps), desc="LLaDA sampling", disable=not progress):
        logits = model(ids, mask)
        x0, order = pick(logits, ids == model.mask_id, schedule[step], temperature, remasking, generator)
        ids = ids.scatter(1, order, x0.gather(1, order))
        decoded_at.scatter_(1, order - P, step)
        done = step + 1
        if early_stop and stop_at_eos(model, ids, P, decoded_at, step):
            break
    n = ids.shape[1]
    return Generation(ids, mask, P, decoded_at, forward_tokens=done * n, log=[("full", n, float(n))] * done)
