"""Passkey retrieval: a five-digit key hidden at a depth of a long, repetitive filler; greedy decoding must
return it (the test of Mohtashami & Jaggi, 2023, in our own wording).

The prompt is prefilled densely once per (context, depth); each method then decodes from a copy of that cache,
so all methods answer the very same prompt.
"""

from __future__ import annotations

import copy
import random

import torch

import prunelab
from prunelab.methods.baselines import DenseDecode

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, context: int, depth: float, key: int) -> torch.Tensor:
    """Token ids of about ``context`` tokens with the key sentence at ``depth`` (0 = start, 1 = end)."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    head = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    f_ids = tokenizer(FILLER)["input_ids"]
    fixed = len(tokenizer(head + needle + QUESTION)["input_ids"])
    reps = max(1, (context - fixed) // len(f_ids))
    before = int(round(depth * reps))
    text = head + FILLER * before + needle + FILLER * (reps - before) + QUESTION
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)


@torch.no_grad()
def _greedy(model, method, cache, first_logits, n: int) -> list[int]:
    tok = first_logits.argmax()
    out = [int(tok)]
    with prunelab.apply(model, method):
        for _ in range(n - 1):
            logits = model(tok.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1]
            tok = logits.argmax()
            out.append(int(tok))
    return out


@torch.no_grad()
def passkey_table(model, tokenizer, contexts, depths, methods: dict, seed: int = 0, progress: bool = True):
    """Rows ``{context, depth, key, method, answer, correct}`` for every case and method (``dense`` added)."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    rows = []
    cases = [(c, d) for c in contexts for d in depths]
    for context, depth in tqdm(cases, desc="passkey prompts", disable=not progress):
        key = rng.randint(10000, 99999)
        ids = passkey_prompt(tokenizer, context, depth, key)
        with prunelab.apply(model, DenseDecode()):
            out = model(ids[None], use_cache=True)
        for name, method in [("dense", DenseDecode()), *methods.items()]:
            answer = tokenizer.decode(_greedy(model, method, copy.deepcopy(out.past_key_values),
                                              out.logits[0, -1], 8))
            rows.append({"context": int(ids.numel()), "depth": depth, "key": key, "method": name,
                         "answer": answer.strip(), "correct": str(key) in answer})
    return rows
