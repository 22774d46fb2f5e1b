"""Window-Diffusion's Dream path: the refresh-every-step anchor, the schedule, the inner window, batches, EOS."""

from __future__ import annotations

import pytest
import torch

from prunelab.methods.window_diffusion import DiffusionLM, tiny_llada
from prunelab.methods.window_diffusion.dream import dream_generate
from prunelab.methods.window_diffusion.dream_window import DreamWindow, dream_schedule, dream_window_generate

V = 64


def dream_like(seed=0) -> DiffusionLM:
    base = tiny_llada(vocab_size=V, seed=seed)
    return DiffusionLM(base.lm, base.mask_id, eos_id=base.eos_id, shift_logits=True)


@pytest.mark.parametrize("window", [4, 100])
def test_refresh_every_step_is_the_leftmost_loop(window):
    model = dream_like()
    prompts = [[3, 14, 15, 9, 2], [6, 5, 3]]
    anchor = dream_generate(model, prompts, 12, window_tokens=window)
    windowed = dream_window_generate(model, prompts, 12, DreamWindow(window_tokens=window, refresh_cycle=1))
    assert torch.equal(windowed.answer, anchor.answer)
    assert [k for k, _, _ in windowed.log] == ["refresh"] * 12


def test_dream_schedule_decodes_everything_by_the_last_step():
    left, total = 64, 0
    for step in range(64):
        n = dream_schedule(left, step, 64)
        total, left = total + n, left - n
    assert total == 64 and left == 0
    assert dream_schedule(10, 0, 10) == 0 and dream_schedule(10, 9, 10) == 10  # floor at the start, all at the end


def test_pruned_steps_compute_the_inner_window_only():
    model = dream_like(seed=1)
    out = dream_window_generate(model, [[1, 2, 3, 4]], 24, DreamWindow(window_tokens=12, active_tokens=4,
                                                                       refresh_cycle=6))
    kinds = [k for k, _, _ in out.log]
    assert kinds[:6] == ["refresh"] + ["pruned"] * 5
    assert out.log[0][1] == 4 + 12  # the prompt and 12 masks: the far field is not computed
    refreshed = 0
    for kind, queries, keys in out.log:  # a pruned step computes its inner window, never the refreshed prefix
        if kind == "refresh":
            refreshed = queries
        else:
            assert queries < refreshed and keys >= queries
    fixed = dream_window_generate(model, [[1, 2, 3, 4]], 24, DreamWindow(window_tokens=12, active_tokens=4,
                                                                         refresh_cycle=6, slide_window=False))
    assert {q for k, q, _ in fixed.log[1:6]} == {4}  # without sliding: the refresh's 4 leftmost masks, one decoded
    assert not bool((out.answer == model.mask_id).any())


def test_batch_with_different_prompt_lengths_equals_single_runs():
    model = dream_like(seed=2).double()
    method = DreamWindow(window_tokens=8, active_tokens=3, refresh_cycle=4)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    batch = dream_window_generate(model, prompts, 16, method)
    for i, p in enumerate(prompts):
        assert torch.equal(batch.answer[i], dream_window_generate(model, [p], 16, method).answer[0])


def test_early_stop_at_batch_one():
    model = dream_like(seed=3)
    out = dream_window_generate(model, [[1, 2, 3]], 16, DreamWindow(window_tokens=8, active_tokens=4,
                                                                   refresh_cycle=4), early_stop=True)
    answer = out.answer[0].tolist()
    if model.eos_id in answer:
        first = answer.index(model.eos_id)
        assert answer[first:] == [model.eos_id] * (16 - first)
    assert model.mask_id not in answer
    with pytest.raises(NotImplementedError, match="early_stop"):
        dream_window_generate(model, [[1], [2]], 4, early_stop=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window_tokens=0), "window_tokens"), (dict(confidence="margin"), "confidence"), (dict(eps=0.0), "eps"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DreamWindow(**kwargs)


def test_llada_models_are_refused():
    with pytest.raises(ValueError, match="shift_logits"):
        dream_window_generate(tiny_llada(vocab_size=V), [[1, 2]], 4)
