"""Window-Diffusion's scheduler and cache: the invariants it must keep, on a tiny random LLaDA-shaped model."""

from __future__ import annotations

import pytest
import torch

from prunelab.methods.window_diffusion import DiffusionLM, llada_generate, tiny_llada
from prunelab.methods.window_diffusion.flops import run_macs, step_macs
from prunelab.methods.window_diffusion.method import WindowDiffusion, window_generate
from prunelab.methods.window_diffusion.window import WindowCache, pad_indices, partial_forward, refresh_forward

V = 64
PROMPTS = [[3, 14, 15, 9, 2, 6], [5, 3, 5]]


@pytest.fixture(scope="module")
def model() -> DiffusionLM:
    return tiny_llada(vocab_size=V, seed=0)


def _sequence(model, n_prompt=6, n_mask=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, V - 2, (1, n_prompt), generator=g), torch.full((1, n_mask), model.mask_id)], 1)
    return ids, torch.ones_like(ids)


def test_refresh_cycle_one_is_the_vanilla_sampler(model):
    vanilla = llada_generate(model, PROMPTS, 20)
    windowed = window_generate(model, PROMPTS, 20, WindowDiffusion(window_tokens=4, active_tokens=2, refresh_cycle=1))
    assert torch.equal(windowed.answer, vanilla.answer) and torch.equal(windowed.decoded_at, vanilla.decoded_at)
    assert [k for k, _, _ in windowed.log] == ["refresh"] * 20


def test_a_fresh_cache_reproduces_the_full_logits(model):
    ids, real = _sequence(model)
    cache = WindowCache(model.config)
    with torch.no_grad():
        full = refresh_forward(model, ids, real, cache)
        everything = torch.arange(ids.shape[1])[None]
        torch.testing.assert_close(partial_forward(model, ids, real, cache, everything, everything,
                                                   torch.ones_like(everything, dtype=torch.bool)), full,
                                   atol=1e-5, rtol=1e-5)
        some = torch.tensor([[7, 8, 20]])  # with W = everything, any A gives the full logits at A
        torch.testing.assert_close(partial_forward(model, ids, real, cache, some, everything,
                                                   torch.ones_like(everything, dtype=torch.bool)), full[:, [7, 8, 20]],
                                   atol=1e-5, rtol=1e-5)


def test_far_field_and_buffer_tokens_are_not_read_until_the_next_refresh(model):
    ids, real = _sequence(model)
    cache = WindowCache(model.config)
    active, window = torch.tensor([[6, 7, 8]]), torch.arange(12)[None]  # far field: 12..23
    valid = torch.ones_like(window, dtype=torch.bool)
    with torch.no_grad():
        refresh_forward(model, ids, real, cache)
        saved = {k: v.clone() for k, v in cache.keys.items()}
        base = partial_forward(model, ids, real, cache, active, window, valid)
        changed = ids.clone()
        changed[0, 12:] = 1  # far field
        changed[0, 9:11] = 2  # buffer: the cache holds the refresh's values
        again = partial_forward(model, changed, real, cache, active, window, valid)
    assert torch.equal(base, again)
    buffer = [i for i in range(24) if i not in (6, 7, 8)]
    assert all(torch.equal(cache.keys[layer][:, :, buffer], saved[layer][:, :, buffer]) for layer in saved)
    # the active rows hold a recomputation: in layer 0 (the tokens' own keys) it equals the refresh; deeper, the
    # active tokens no longer see the far field, so their keys move
    assert torch.allclose(cache.keys[0][:, :, [6, 7, 8]], saved[0][:, :, [6, 7, 8]], atol=1e-6)
    assert not torch.allclose(cache.keys[1][:, :, [6, 7, 8]], saved[1][:, :, [6, 7, 8]], atol=1e-6)


def test_active_rows_change_when_their_tokens_do(model):
    ids, real = _sequence(model)
    cache = WindowCache(model.config)
    with torch.no_grad():
        refresh_forward(model, ids, real, cache)
        saved = cache.keys[0].clone()
        decoded = ids.clone()
        decoded[0, 6] = 4  # a token decoded since the refresh
        partial_forward(model, decoded, real, cache, torch.tensor([[6, 7]]), torch.arange(12)[None],
                        torch.ones(1, 12, dtype=torch.bool))
    assert not torch.allclose(cache.keys[0][:, :, 6], saved[:, :, 6])


@pytest.mark.parametrize("cycle", [4, 8])
def test_partition_and_every_position_decoded_once(model, cycle):
    method = WindowDiffusion(window_tokens=10, active_tokens=3, refresh_cycle=cycle, on_overflow="error")
    out = window_generate(model, PROMPTS, 24, method)
    assert not bool((out.answer == model.mask_id).any())
    assert all(sorted(row.tolist()) == list(range(24)) for row in out.decoded_at)  # one token per step, each once
    kinds = [k for k, _, _ in out.log]
    assert kinds == (["refresh"] + ["pruned"] * (cycle - 1)) * (24 // cycle)
    for kind, queries, keys in out.log:
        if kind == "pruned":  # A: at most a masks plus the phase's decodes; W: prompt + decoded + at most w masks
            assert queries <= method.active_tokens + cycle - 1 and queries <= keys
    assert out.forward_tokens < llada_generate(model, PROMPTS, 24).forward_tokens


def test_overflow_forces_a_refresh_or_raises(model):
    tight = dict(window_tokens=3, active_tokens=2, refresh_cycle=8)
    with pytest.raises(RuntimeError, match="on_overflow"):
        window_generate(model, PROMPTS, 16, WindowDiffusion(**tight, on_overflow="error"))
    out = window_generate(model, PROMPTS, 16, WindowDiffusion(**tight))
    kinds = [k for k, _, _ in out.log]
    assert kinds.count("refresh") > 2 and not bool((out.answer == model.mask_id).any())


def test_window_scope_computes_only_the_prefix(model):
    out = window_generate(model, [[1, 2, 3]], 24, WindowDiffusion(window_tokens=6, active_tokens=2, refresh_cycle=4,
                                                                  refresh_scope="window", refresh_decode="leftmost"))
    refreshes = [q for k, q, _ in out.log if k == "refresh"]
    assert refreshes[0] == 3 + 6 and all(q < 27 for q in refreshes[:-1])
    assert out.decoded_at[0, 0] == 0  # the leftmost mask first


def test_batch_with_different_prompt_lengths_equals_single_runs():
    model = tiny_llada(vocab_size=V, seed=2).double()
    method = WindowDiffusion(window_tokens=8, active_tokens=3, refresh_cycle=4)
    batch = window_generate(model, PROMPTS, 16, method)
    for i, p in enumerate(PROMPTS):
        assert torch.equal(batch.answer[i], window_generate(model, [p], 16, method).answer[0])


def test_flops_of_a_run(model):
    vanilla = llada_generate(model, [[1, 2, 3]], 12)
    n = 15
    assert run_macs(model.config, vanilla.log) == pytest.approx(12 * step_macs(model.config, n, n))
    windowed = window_generate(model, [[1, 2, 3]], 12, WindowDiffusion(window_tokens=6, active_tokens=2,
                                                                       refresh_cycle=6))
    assert run_macs(model.config, windowed.log) < run_macs(model.config, vanilla.log)


def test_pad_indices():
    idx, valid = pad_indices([torch.tensor([2, 4, 6]), torch.tensor([1])])
    assert idx.tolist() == [[2, 4, 6], [1, 1, 1]] and valid.tolist() == [[True] * 3, [True, False, False]]


@pytest.mark.parametrize("kwargs,match", [
    (dict(window_tokens=0), "window_tokens"), (dict(active_tokens=9, window_tokens=8), "active_tokens"),
    (dict(refresh_cycle=0), "refresh_cycle"), (dict(refresh_scope="far"), "refresh_scope"),
    (dict(refresh_decode="random"), "refresh_decode"), (dict(on_overflow="ignore"), "on_overflow"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WindowDiffusion(**kwargs)


def test_dream_models_are_sent_to_their_path(model):
    dream = DiffusionLM(model.lm, model.mask_id, shift_logits=True)
    with pytest.raises(ValueError, match="dream_window_generate"):
        window_generate(dream, [[1, 2]], 4)


def test_the_trace_draws_the_partition_of_every_step(model):
    from prunelab.common.reduction import Reduction, check_reduction
    from prunelab.methods.window_diffusion.samplers import ACTIVE, BUFFER, FAR

    method = WindowDiffusion(window_tokens=6, active_tokens=3, refresh_cycle=4)
    out = window_generate(model, PROMPTS, 16, method, trace=True)
    plain = window_generate(model, PROMPTS, 16, method)
    assert torch.equal(out.ids, plain.ids) and plain.partition == []  # tracing changes nothing
    assert len(out.partition) == len(out.log)
    for (kind, queries, keys), codes in zip(out.log, out.partition):
        active = codes == ACTIVE
        assert active.sum(1).tolist() == [queries] * 2 or kind == "refresh"
        if kind == "pruned":  # A is a valid kept-token set over positions, read W = A + buffer
            idx = torch.sort(torch.where(active, torch.arange(codes.shape[1]), codes.shape[1]), 1).values[:, :queries]
            check_reduction(Reduction(idx, codes.shape[1]), name="active set")
            assert (codes != FAR).sum(1).float().mean() == keys
            assert bool((codes[:, :out.prompt_length] != FAR)[out.attention_mask[:, :out.prompt_length].bool()].all())
        else:
            assert not bool((codes == BUFFER).any())
