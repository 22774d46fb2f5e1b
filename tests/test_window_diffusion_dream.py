"""Dream's leftmost-mask sampler: a plain reference loop, batches, the EOS stop, Dream's token sampling."""

from __future__ import annotations

import math

import pytest
import torch

from prunelab.methods.window_diffusion import DiffusionLM, tiny_llada
from prunelab.methods.window_diffusion.dream import dream_generate, filter_logits, sample_tokens

V = 64


def dream_like(seed=0) -> DiffusionLM:
    base = tiny_llada(vocab_size=V, seed=seed)
    return DiffusionLM(base.lm, base.mask_id, eos_id=base.eos_id, shift_logits=True)


def reference_dream(model, prompt, n):
    """Decode the leftmost mask with the argmax of Dream's shifted logits, n times."""
    x = torch.cat([torch.as_tensor(prompt), torch.full((n,), model.mask_id)])[None]
    for t in range(n):
        with torch.no_grad():
            logits = model.lm(input_ids=x, attention_mask=torch.ones(1, 1, x.shape[1], x.shape[1],
                                                                      dtype=torch.bool)).logits
        x[0, len(prompt) + t] = logits[0, len(prompt) + t - 1].argmax()  # the shift: position i from i - 1
    return x[0, len(prompt):]


def test_equals_a_plain_leftmost_loop():
    model = dream_like()
    prompt = [3, 14, 15, 9, 2]
    out = dream_generate(model, [prompt], 10)
    assert torch.equal(out.answer[0], reference_dream(model, prompt, 10))
    assert out.decoded_at[0].tolist() == list(range(10))


def test_batch_with_different_prompt_lengths_equals_single_runs():
    model = dream_like(seed=3)
    model.double()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    batch = dream_generate(model, prompts, 8)
    for i, p in enumerate(prompts):
        assert torch.equal(batch.answer[i], dream_generate(model, [p], 8).answer[0])


class EOSAt(DiffusionLM):
    """A Dream-like model that strongly predicts EOS at answer position ``at`` of row 0."""

    def __init__(self, base, prompt_length, at):
        super().__init__(base.lm, base.mask_id, eos_id=base.eos_id, shift_logits=True)
        self.where = prompt_length + at

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = super().forward(input_ids, attention_mask, position_ids)
        if input_ids.shape[0] == 2 and logits.shape[1] > self.where:
            logits[0, self.where, self.eos_id] += 1e4
        return logits


def test_early_stop_fills_after_the_first_eos_and_stops_the_row():
    model = EOSAt(dream_like(seed=1), prompt_length=4, at=2)
    out = dream_generate(model, [[1, 2, 3, 4], [5, 6, 7, 8]], 8, early_stop=True)
    row = out.answer[0].tolist()
    assert row[2] == model.eos_id and row[3:] == [model.eos_id] * 5 and model.mask_id not in row
    assert out.decoded_at[0, 3:].tolist() == [-1] * 5  # never computed
    assert model.mask_id not in out.answer[1].tolist() and out.decoded_at[1].tolist() == list(range(8))
    again = dream_generate(model, [[1, 2, 3, 4], [5, 6, 7, 8]], 8)  # without the stop, row 0 goes on decoding
    assert again.answer[0, 3:].ne(model.eos_id).any()


def test_window_limits_the_computed_prefix():
    model = dream_like()
    wide = dream_generate(model, [[1, 2, 3]], 6, window_tokens=50)
    full = dream_generate(model, [[1, 2, 3]], 6)
    assert torch.equal(wide.answer, full.answer)
    narrow = dream_generate(model, [[1, 2, 3]], 6, window_tokens=2)
    assert [q for _, q, _ in narrow.log] == [5, 6, 7, 8, 9, 9]


def test_sample_tokens_confidences():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3]]))
    ent, x0 = sample_tokens(logits)
    assert x0[0] == 0 and ent[1] == pytest.approx(-math.log(3), abs=1e-5)
    top, _ = sample_tokens(logits, confidence="maskgit_plus")
    margin, _ = sample_tokens(logits, confidence="topk_margin")
    assert top[0] == pytest.approx(0.5) and margin[0] == pytest.approx(0.2)
    draws = {int(sample_tokens(logits[:1], temperature=1.0, generator=torch.Generator().manual_seed(s))[1])
             for s in range(40)}
    assert draws == {0, 1, 2}


def test_filter_logits_top_p_and_top_k():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_logits(logits, top_p=0.7) > torch.finfo(torch.float32).min
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7, then 0.8 reaches it
    kept = filter_logits(logits, top_k=3) > torch.finfo(torch.float32).min
    assert kept.tolist() == [True, True, True, False]


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=4, window_tokens=0), "window_tokens"),
    (dict(max_new_tokens=4, temperature=-0.5), "temperature"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dream_generate(dream_like(), [[1, 2]], **kwargs)
    with pytest.raises(ValueError, match="confidence"):
        sample_tokens(torch.zeros(2, 3), confidence="margin")
