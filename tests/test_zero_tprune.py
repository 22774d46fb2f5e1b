"""Zero-TPrune: WPR, head aggregation, S-stage and the method on random-weight timm ViTs."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import prunelab
from prunelab.common.schedule import TokenSchedule
from prunelab.methods.zero_tprune import (
    ZeroTPrune,
    aggregate_heads,
    emphasize_informative_region,
    initial_distribution,
    restrict_attention,
    sequential_u_partition,
    similarity_prune,
    variance_head_filter,
    wpr_scores,
)


def random_attention(b, h, n, seed=0, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, n, generator=g, dtype=torch.float64) / temperature).softmax(-1)


def model(name="deit_small_patch16_224", img=224):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=img).eval()


# --- WPR ----------------------------------------------------------------------------------------------

def test_initial_distribution_boosts_class_tokens_by_sqrt_n():
    s0 = initial_distribution(197, (0,), 2, dtype=torch.float64)
    assert torch.allclose(s0.sum(-1), torch.ones(2, dtype=torch.float64))
    assert math.isclose(s0[0, 0] / s0[0, 1], math.sqrt(197))
    assert torch.allclose(initial_distribution(5, (0,), 1, cls_boost=False), torch.full((1, 5), 0.2))


@pytest.mark.parametrize("iters", [1, 3, 50])
def test_wpr_conserves_mass_and_stays_positive(iters):
    a = random_attention(2, 3, 17)
    s = wpr_scores(a, initial_distribution(17, (0,), 2, dtype=torch.float64), iters)
    assert torch.allclose(s.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert (s > 0).all()


def test_one_iteration_from_uniform_is_the_column_mean():
    a = random_attention(2, 3, 11)
    s = wpr_scores(a, initial_distribution(11, (), 2, cls_boost=False, dtype=torch.float64), 1)
    assert torch.allclose(s, a.mean(-2))


def test_wpr_converges_to_the_stationary_distribution_from_any_start():
    a = random_attention(1, 2, 24, temperature=0.5)
    limits = [wpr_scores(a, initial_distribution(24, (0,), 1, cls_boost=c, dtype=torch.float64), 200)
              for c in (True, False)]
    assert torch.allclose(limits[0], limits[1], atol=1e-12)
    for h in range(2):
        vals, vecs = torch.linalg.eig(a[0, h].T)
        v = vecs[:, torch.argmin((vals - 1).abs())].real
        v = v / v.sum()
        assert torch.allclose(limits[0][0, h], v, atol=1e-10)


def test_wpr_special_cases():
    n = 9
    uniform = torch.full((1, 1, n, n), 1.0 / n, dtype=torch.float64)
    s0 = initial_distribution(n, (0,), 1, dtype=torch.float64)
    assert torch.allclose(wpr_scores(uniform, s0, 5), torch.full((1, 1, n), 1.0 / n, dtype=torch.float64))
    eye = torch.eye(n, dtype=torch.float64)[None, None]
    assert torch.allclose(wpr_scores(eye, s0, 5)[0, 0], s0[0])


def test_wpr_is_permutation_equivariant():
    a = random_attention(1, 2, 13)
    perm = torch.randperm(13, generator=torch.Generator().manual_seed(1))
    s0 = torch.rand(1, 13, dtype=torch.float64)
    s0 = s0 / s0.sum()
    s = wpr_scores(a, s0, 7)
    sp = wpr_scores(a[:, :, perm][:, :, :, perm], s0[:, perm], 7)
    assert torch.allclose(sp, s[:, :, perm])


# --- head aggregation -----------------------------------------------------------------------------------

def test_eir_properties():
    s = torch.rand(2, 4, 10, dtype=torch.float64)
    assert torch.allclose(emphasize_informative_region(s[:, :1]), s[:, 0])
    same = s[:, :1].expand(-1, 4, -1)
    assert torch.allclose(emphasize_informative_region(same), s[:, 0])
    assert (emphasize_informative_region(s) >= s.mean(1) - 1e-12).all()  # RMS >= mean


def test_vhf_filtered_head_never_changes_the_result_and_fallback_is_all_heads():
    n = 50
    flat = torch.full((1, 1, n), 1.0 / n, dtype=torch.float64)  # variance 0: outside the band
    g = torch.Generator().manual_seed(0)
    peaked = torch.softmax(0.5 * torch.randn(1, 2, n, generator=g, dtype=torch.float64), -1)
    band = (0.01, 0.7)
    assert variance_head_filter(flat, band).tolist() == [[False]]
    assert variance_head_filter(peaked, band).tolist() == [[True, True]]
    with_flat = aggregate_heads(torch.cat([peaked, flat], 1), band)
    assert torch.allclose(with_flat, aggregate_heads(peaked, band))
    # every head outside the band: all heads are used, deterministically
    assert torch.allclose(aggregate_heads(flat.expand(-1, 3, -1), band), flat[:, 0])


# --- S-stage ---------------------------------------------------------------------------------------------

def test_partition_puts_the_less_important_half_in_group_a():
    imp = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9, 0.2]])  # token 0 is the protected CLS
    a, b = sequential_u_partition(imp, 1)
    assert a.tolist() == [[1, 5]] and sorted(b[0].tolist()) == [2, 3, 4]


def test_s_stage_drops_exact_duplicates_first_and_only_from_group_a():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 11, 8, generator=g)
    imp = torch.linspace(0, 1, 11).expand(2, -1).flip(-1).contiguous()  # token 10 least important
    keys[:, :, 10] = keys[:, :, 2]  # token 10 (group A) duplicates token 2 (group B)
    keep = similarity_prune(keys, imp, 1, 1)
    assert keep.shape == (2, 10) and (keep != 10).all()
    group_a = sequential_u_partition(imp, 1)[0]
    for r in range(0, 6):
        dropped = set(range(11)) - set(similarity_prune(keys, imp, r, 1)[0].tolist())
        assert dropped <= set(group_a[0].tolist()) and len(dropped) == r


def test_restrict_attention_renormalizes_rows():
    a = random_attention(2, 2, 9)
    keep = torch.tensor([[0, 2, 5, 8], [0, 1, 3, 4]])
    sub = restrict_attention(a, keep)
    assert torch.allclose(sub.sum(-1), torch.ones(2, 2, 4, dtype=torch.float64))
    raw = restrict_attention(a, keep, renormalize=False)
    assert torch.allclose(raw[1, 0], a[1, 0][keep[1]][:, keep[1]])


# --- the method on a timm ViT ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_budgets_respected_and_prefix_survives(name):
    m, x = model(name, 96), torch.randn(3, 3, 96, 96)
    method = ZeroTPrune(schedule=TokenSchedule((2, 5, 8), (8, 6, 4)))
    p = m.num_prefix_tokens
    with torch.no_grad(), prunelab.apply(m, method) as handle:
        m(x)
        kept_batch = [ids.clone() for _, ids in handle.state.kept]
    n = 36 + p
    for r, ids in zip((8, 6, 4), kept_batch):
        n -= r
        assert ids.shape == (3, n)
        assert (ids[:, :p] == torch.arange(p)).all()  # CLS (and DIST) first and kept
        assert (ids[:, 1:] > ids[:, :-1]).all()


def test_default_is_the_paper_operating_point_on_deit_s():
    m = model()
    with prunelab.apply(m, ZeroTPrune()) as handle:
        from prunelab.common.flops import ViTDims, vit_gflops

        g = vit_gflops(ViTDims.from_timm(m), handle.plan.tokens_per_block)
    assert 2.95 < g <= 3.0  # 4.6 GFLOPs - 34.7 %


def test_budget_above_token_count_and_two_budgets_are_rejected():
    m = model("deit_tiny_patch16_224", 96)
    with pytest.raises(ValueError, match="schedule"):
        prunelab.apply(m, ZeroTPrune(schedule=TokenSchedule((2,), (40,))))
    with pytest.raises(ValueError, match="schedule: the S-stage"):
        prunelab.apply(m, ZeroTPrune(schedule=TokenSchedule((2,), (34,)), similarity_share=1.0))
    with pytest.raises(ValueError, match="keep_ratio and gflops"):
        prunelab.apply(m, ZeroTPrune(keep_ratio=0.5, gflops=1.0))


def test_nan_activations_raise_naming_x():
    m = model("deit_tiny_patch16_224", 96)
    x = torch.randn(1, 3, 96, 96)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad(), prunelab.apply(m, ZeroTPrune(keep_ratio=0.5)):
        with pytest.raises(ValueError, match="x: the activations"):
            m(x)


@pytest.mark.parametrize("name", [
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "deit_small_distilled_patch16_224", "vit_small_patch16_224.augreg_in21k_ft_in1k",
])
def test_every_supported_family_prunes_and_restores(name):
    m, x = model(name, 64), torch.randn(2, 3, 64, 64)  # 16 patches: the real layout, small compute
    with torch.no_grad():
        dense = m(x)
        with prunelab.apply(m, ZeroTPrune(keep_ratio=0.75)) as handle:
            pruned = m(x)
        assert handle.state.tokens_per_block == [m.num_prefix_tokens + n for n in (12, 9, 7)]
        assert torch.isfinite(pruned).all() and not torch.allclose(pruned, dense)
        assert torch.equal(m(x), dense)


def test_row_scale_equals_iterating_on_the_renormalized_subgraph():
    a = random_attention(2, 3, 12)
    keep = torch.tensor([[0, 1, 4, 5, 9, 11], [0, 2, 3, 6, 7, 8]])
    raw = restrict_attention(a, keep, renormalize=False)
    s0 = initial_distribution(6, (0,), 2, dtype=torch.float64)
    expected = wpr_scores(restrict_attention(a, keep), s0, 7)
    torch.testing.assert_close(wpr_scores(raw, s0, 7, raw.sum(-1).reciprocal()), expected)
