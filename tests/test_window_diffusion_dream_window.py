"""Window-Diffusion's Dream path: the refresh-every-step anchor, the schedule, the inner window, batches, EOS."""

from __future__ import annotations

import pytest
import torch

from prunelab.methods.window_diffusion import DiffusionLM, dream_window, run_macs, tiny_llada
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
    singles = [dream_window_generate(model, [p], 16, method) for p in prompts]
    for i, single in enumerate(singles):
        assert torch.equal(batch.answer[i], single.answer[0])
    # the log counts real tokens: the batch's MACs are its rows' single runs', padding not counted
    assert 2 * run_macs(model.config, batch.log) == pytest.approx(sum(run_macs(model.config, s.log) for s in singles))


def test_early_stop_at_batch_one():
    model = dream_like(seed=3)
    out = dream_window_generate(model, [[1, 2, 3]], 16, DreamWindow(window_tokens=8, active_tokens=4,
                                                                   refresh_cycle=4), early_stop=True)
    answer = out.answer[0].tolist()
    if model.eos_id in answer:
        first = answer.index(model.eos_id)
        assert answer[first:] == [model.eos_id] * (16 - first)
    assert model.mask_id not in answer
    with pytest.raises(ValueError, match="early_stop"):
        dream_window_generate(DiffusionLM(model.lm, model.mask_id, shift_logits=True), [[1]], 4, early_stop=True)


def record_schedules(monkeypatch, calls):
    """Spy on the forwards: each call's kind and its rows, each named by its first real token (its prompt's)."""
    def spy(kind, forward):
        def run(model, ids, attention_mask, *args):
            calls.append((kind, [int(row[keep.bool()][0]) for row, keep in zip(ids, attention_mask)]))
            return forward(model, ids, attention_mask, *args)
        return run

    monkeypatch.setattr(dream_window, "refresh_forward", spy("refresh", dream_window.refresh_forward))
    monkeypatch.setattr(dream_window, "partial_forward", spy("pruned", dream_window.partial_forward))


def test_early_stop_batch_equals_single_runs_row_by_row(monkeypatch):
    # EOS = 46, a token this random model likes: EOS mid-answer in rows 1 and 2 at different steps, none in row 0
    base = dream_like(seed=6).double()
    model = DiffusionLM(base.lm, base.mask_id, eos_id=46, shift_logits=True)
    method = DreamWindow(window_tokens=8, active_tokens=4, refresh_cycle=4)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    calls = []
    record_schedules(monkeypatch, calls)
    singles, schedules = [], []
    for p in prompts:
        calls.clear()
        singles.append(dream_window_generate(model, [p], 16, method, early_stop=True))
        schedules.append([kind for kind, _ in calls])
    calls.clear()
    batch = dream_window_generate(model, prompts, 16, method, early_stop=True)

    firsts = [s.answer[0].tolist().index(46) if 46 in s.answer[0].tolist() else None for s in singles]
    assert firsts[0] is None and 0 < firsts[1] < 15 and 0 < firsts[2] < 15
    assert len({len(s) for s in schedules}) == 3  # the rows finish at different steps
    for i in (1, 2):  # a stopped row refreshes (up to its EOS) while row 0 is in a pruned step
        stopped = max(t for t, kind in enumerate(schedules[i]) if kind == "pruned")
        assert stopped < len(schedules[i]) - 1 and "pruned" in schedules[0][stopped + 1:len(schedules[i])]
        assert all(q == len(prompts[i]) + firsts[i] + 1 for _, q, _ in singles[i].log[stopped + 1:])

    for i, (p, single) in enumerate(zip(prompts, singles)):
        assert torch.equal(batch.answer[i], single.answer[0])
        assert torch.equal(batch.decoded_at[i], single.decoded_at[0])
        assert [kind for kind, rows in calls if p[0] in rows] == schedules[i]  # the same refresh / pruned steps
        answer = batch.answer[i].tolist()
        assert model.mask_id not in answer
        if firsts[i] is not None:
            assert answer[firsts[i]:] == [46] * (16 - firsts[i])
    steps = max(len(s) for s in schedules)
    assert steps < len(calls) <= 2 * steps  # one forward per step, two where the rows split, none per row
    assert 3 * run_macs(model.config, batch.log) == pytest.approx(sum(run_macs(model.config, s.log) for s in singles))
    assert 3 * batch.forward_tokens == pytest.approx(sum(s.forward_tokens for s in singles))


def test_an_eos_decoded_by_a_refresh_stops_the_row_at_the_next_pruned_step(monkeypatch):
    model = dream_like(seed=6).double()
    method = DreamWindow(window_tokens=8, active_tokens=4, refresh_cycle=4)
    refresh, seen = dream_window.refresh_forward, []

    def eos_at_second_refresh(model_, ids, attention_mask, cache):  # of the row prompted [5, 6, 7]: step 4
        logits = refresh(model_, ids, attention_mask, cache)
        for r, (row, keep) in enumerate(zip(ids, attention_mask)):
            seen.append(int(row[keep.bool()][0]))
            if seen[-1] == 5 and seen.count(5) == 2:
                logits[r, :, model.eos_id] += 1e4
        return logits

    monkeypatch.setattr(dream_window, "refresh_forward", eos_at_second_refresh)
    alone = dream_window_generate(model, [[5, 6, 7]], 16, method, early_stop=True)
    first = int(torch.nonzero(alone.decoded_at[0] == 4)[0])  # the refresh's leftmost mask, now EOS
    assert alone.answer[0, first:].tolist() == [model.eos_id] * (16 - first) and first < 15
    assert [k for k, _, _ in alone.log] == ["refresh"] + ["pruned"] * 3 + ["refresh", "pruned"]
    seen.clear()
    other = dream_window_generate(model, [[12, 13]], 16, method, early_stop=True)
    seen.clear()
    batch = dream_window_generate(model, [[5, 6, 7], [12, 13]], 16, method, early_stop=True)
    assert torch.equal(batch.answer[0], alone.answer[0]) and torch.equal(batch.answer[1], other.answer[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(window_tokens=0), "window_tokens"), (dict(confidence="margin"), "confidence"), (dict(eps=0.0), "eps"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DreamWindow(**kwargs)


def test_llada_models_are_refused():
    with pytest.raises(ValueError, match="shift_logits"):
        dream_window_generate(tiny_llada(vocab_size=V), [[1, 2]], 4)
