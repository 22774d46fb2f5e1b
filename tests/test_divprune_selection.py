"""Tests for prunelab.methods.divprune.selection: DivPrune's greedy max-min diversity selection.

The brute-force oracles below are plain Python loops over the distance matrix, written from the paper's
formulas (the MMDP objective and its greedy solution) independently of the library's running-min form.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from prunelab.common.reduction import Reduction, check_reduction
from prunelab.kernels.max_min_diversity import max_min_diversity_order
from prunelab.methods.divprune import cosine_distance, max_min_diversity


def _x(b, m, c, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, c, generator=g).to(dtype)


def _argmax_first(values, candidates):
    """Lowest index among the candidates with the largest value (the documented tie rule)."""
    best = max(values[j] for j in candidates)
    return min(j for j in candidates if values[j] == best)


def brute_force_greedy(dist, k):
    """O(k * M * k) greedy on one [M, M] matrix: re-evaluates min over the chosen set at every step."""
    d = dist.tolist()
    M = len(d)
    nn = [min((d[i][j] for i in range(M) if i != j), default=math.inf) for j in range(M)]
    chosen = [_argmax_first(nn, range(M))]
    while len(chosen) < k:
        rest = [j for j in range(M) if j not in chosen]
        md = {j: min(d[s][j] for s in chosen) for j in rest}
        chosen.append(_argmax_first(md, rest))
    return chosen


def brute_force_official(dist, k):
    """The official rules on one [M, M] matrix: 2nd-smallest column entry first, then no masking."""
    d = dist.tolist()
    M = len(d)
    scores = [sorted(d[i][j] for i in range(M))[1] for j in range(M)]
    chosen = []
    for _ in range(k):
        chosen.append(_argmax_first(scores, range(M)))
        scores = [min(d[s][j] for s in chosen) for j in range(M)]
    return sorted(chosen)


def _official_distance_fp(x):
    """Official-style distance of one row [M, C], each op in x.dtype (re-derived here, not imported)."""
    n = x / x.norm(dim=-1, keepdim=True)
    return 1.0 - n @ n.T


def _exact_vectors(n, c, seed):
    """n distinct vectors with four +-1 entries: norm exactly 2, so every cosine is exact in fp32 and fp16."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        v = torch.zeros(c)
        v[torch.randperm(c, generator=g)[:4]] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
        if all(not torch.equal(v, u) and not torch.equal(v, -u) for u in out):
            out.append(v)
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------
# cosine distance
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cosine_distance_matches_formula(dtype):
    x = _x(2, 23, 40, dtype=dtype)
    d = cosine_distance(x)
    xd = x.double()
    ref = 1 - (xd @ xd.mT) / (xd.norm(dim=-1)[:, :, None] * xd.norm(dim=-1)[:, None, :])
    assert d.dtype == torch.float32 and d.shape == (2, 23, 23)
    torch.testing.assert_close(d.double(), ref, atol=1e-6, rtol=0)  # fp32 math on the dtype's values


def test_cosine_distance_zero_row_and_scale():
    x = _x(1, 5, 8)
    x[0, 2] = 0
    d = cosine_distance(x)
    assert torch.equal(d[0, 2], torch.ones(5)) and torch.equal(d[0, :, 2], torch.ones(5))
    assert torch.equal(cosine_distance(x * 8.0), d)  # powers of two scale exactly, so bit-identical


# ----------------------------------------------------------------------------------------------------------
# the paper's algorithm
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,c,seed", [(12, 5, 8, 0), (17, 17, 6, 1), (30, 9, 3, 2), (9, 1, 4, 3)])
def test_greedy_trace_matches_brute_force(m, k, c, seed):
    x = _x(2, m, c, seed)
    order, score = max_min_diversity_order(x, k, impl="torch")
    d = cosine_distance(x)
    for b in range(2):
        assert order[b].tolist() == brute_force_greedy(d[b], k)
        # the score of step t is the max-min value it achieved
        for t in range(1, k):
            assert score[b, t] == min(d[b, s, order[b, t]] for s in order[b, :t])
    assert torch.equal(max_min_diversity(x, k), order.sort(dim=-1).values)


def test_first_pick_is_farthest_nearest_neighbour():
    # one token far from a tight cluster: its nearest neighbour is the farthest, so it goes first
    x = _x(1, 20, 16, seed=4) * 0.01 + torch.ones(16)
    x[0, 13] = -torch.ones(16)
    order, score = max_min_diversity_order(x, 1, impl="torch")
    assert order.item() == 13
    d = cosine_distance(x)[0]
    nn = (d + torch.diag(torch.full((20,), math.inf))).amin(dim=0)
    assert score.item() == nn.max().item() == nn[13].item()


def test_scores_non_increasing_after_first():
    _, score = max_min_diversity_order(_x(3, 64, 32, seed=5), 40, impl="torch")
    assert (score[:, 2:] <= score[:, 1:-1]).all()


@pytest.mark.parametrize("m", [1, 2, 7, 63])
def test_keep_all_is_arange(m):
    assert torch.equal(max_min_diversity(_x(2, m, 5), m), torch.arange(m).expand(2, m))


def test_kept_index_contract():
    keep = max_min_diversity(_x(3, 50, 12, seed=6), 17)
    assert keep.dtype == torch.int64
    check_reduction(Reduction(keep, 50))  # int64, sorted ascending, unique, in range
    assert keep.shape == (3, 17)


def test_batch_equals_per_sample():
    x = _x(4, 41, 24, seed=7)
    keep = max_min_diversity(x, 11)
    for b in range(4):
        assert torch.equal(keep[b], max_min_diversity(x[b : b + 1], 11)[0])


def test_scale_and_permutation_invariance():
    x = _x(1, 40, 32, seed=8)
    keep = max_min_diversity(x, 10)
    scales = 2.0 ** torch.randint(-6, 7, (1, 40, 1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(max_min_diversity(x * scales, 10), keep)  # cosine ignores the norm
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    keep_p = max_min_diversity(x[:, perm], 10)
    assert torch.equal(perm[keep_p].sort(dim=-1).values, keep)  # random data: no ties to reorder


def test_duplicates_never_repeat():
    # 100 tokens holding 10 identical copies, k = 95: the official loop re-picks here (90 unique)
    x = _x(1, 100, 16, seed=9)
    x[0, 50:60] = x[0, 50]
    keep = max_min_diversity(x, 95)
    check_reduction(Reduction(keep, 100))
    assert keep.unique().numel() == 95


def _min_pairwise(dist, subset):
    return min(dist[i, j].item() for i, j in itertools.combinations(subset, 2))


def test_two_approximation_in_angular_distance():
    # Gonzalez greedy is a 1/2-approximation of the MMDP optimum for a metric. 1 - cos is not one, but the
    # greedy only compares distances, so it also runs greedy on the monotone angular metric arccos(cos).
    for seed in range(3):
        x = _x(1, 11, 3, seed=10 + seed)
        ang = torch.arccos((1 - cosine_distance(x)[0].double()).clamp(-1, 1))
        k = 4
        keep = max_min_diversity(x, k)[0].tolist()

        best = max(_min_pairwise(ang, s) for s in itertools.combinations(range(11), k))
        assert _min_pairwise(ang, keep) >= 0.5 * best - 1e-9


def test_valid_mask_ragged_batch():
    x = _x(2, 40, 16, seed=11)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 27:] = False  # right padding
    valid[0, ::3] = False  # an arbitrary, non-prefix mask
    # padding that would otherwise be picked first: far from everything and mutually orthogonal
    x[~valid] = torch.eye(16).repeat(2, 1)[: int((~valid).sum())] * 100
    keep = max_min_diversity(x, 9, valid=valid)
    check_reduction(Reduction(keep, 40))
    for b in range(2):
        idx = valid[b].nonzero()[:, 0]
        assert valid[b, keep[b]].all()
        assert torch.equal(keep[b], idx[max_min_diversity(x[b : b + 1, idx], 9)[0]])
    # every valid token: k = valid count keeps them all
    assert torch.equal(max_min_diversity(x[1:], 27, valid=valid[1:])[0], torch.arange(27))


def test_valid_mask_single_token_row():
    x = _x(2, 6, 4, seed=12)
    valid = torch.zeros(2, 6, dtype=torch.bool)
    valid[0, 4] = True
    valid[1] = True
    assert max_min_diversity(x, 1, valid=valid)[0].item() == 4


# ----------------------------------------------------------------------------------------------------------
# official_quirks
# ----------------------------------------------------------------------------------------------------------


def test_quirk1_repicks_on_exact_duplicates():
    # 6 distinct vectors plus 4 copies of token 2; every distance is exact, so after the 6 distinct picks
    # every score is exactly 0 and the official argmax returns index 0 again (already chosen)
    x = torch.cat([_exact_vectors(6, 8, seed=0), _exact_vectors(6, 8, seed=0)[2].expand(4, 8)])[None]
    quirky = max_min_diversity(x, 8, official_quirks=True)[0]
    assert quirky.tolist() == brute_force_official(_official_distance_fp(x[0]), 8)
    assert quirky.unique().numel() == 6 and (quirky == 0).sum() == 3  # two re-picks of token 0
    ours = max_min_diversity(x, 8)[0]
    check_reduction(Reduction(ours[None], 10))
    assert ours.tolist() == sorted(brute_force_greedy(cosine_distance(x)[0], 8))


def test_quirk2_second_smallest_first_pick():
    # fp16 near-duplicate pairs: rounding leaves Dist[j, j] above other entries of column j
    found = False
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(8, 16, generator=g)
        x = torch.cat([base, base + 1e-3 * torch.randn(8, 16, generator=g)]).half()
        d = _official_distance_fp(x).float()
        quirky = max_min_diversity(x[None], 1, official_quirks=True).item()
        assert quirky == int(d.topk(2, dim=0, largest=False).values[1].argmax())
        assert max_min_diversity(x[None], 3, official_quirks=True)[0].tolist() == brute_force_official(d, 3)
        excl = (d + torch.diag(torch.full((16,), math.inf))).amin(dim=0)
        found |= quirky != int(excl.argmax())  # same matrix, paper's first-pick rule
    assert found, "no seed separated the 2nd-smallest rule from min over i != j"


def test_quirk3_distance_dtype():
    x = torch.cat([_x(1, 8, 16, seed=13)] * 2, dim=1)
    x[0, 8:] += 1e-3 * _x(1, 8, 16, seed=14)[0]
    x = x.half()
    differs = max_min_diversity(x, 4, official_quirks=True) != max_min_diversity(x.float(), 4, official_quirks=True)
    assert differs.any()  # fp16 rounding of the distances changes the selection of near-duplicates


def test_quirks_match_paper_on_separated_fp32_data():
    # duplicate-free, well-separated tokens: the official greedy and ours pick the same tokens
    x = _x(3, 60, 32, seed=15)
    assert torch.equal(max_min_diversity(x, 20, official_quirks=True), max_min_diversity(x, 20))


def test_quirks_valid_mask_runs_per_valid_subset():
    x = _x(2, 30, 16, seed=16)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[0, 20:] = False
    keep = max_min_diversity(x, 6, official_quirks=True, valid=valid)
    assert torch.equal(keep[0], max_min_diversity(x[:1, :20], 6, official_quirks=True)[0])
    assert torch.equal(keep[1], max_min_diversity(x[1:], 6, official_quirks=True)[0])


# ----------------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(k=0), "k"),
        (dict(k=-3), "k"),
        (dict(k=11), "k"),
        (dict(k=2.0), "k"),
        (dict(k=True), "k"),
        (dict(x=torch.randint(0, 5, (2, 10, 4))), "x"),
        (dict(x=torch.randn(2, 10, 4, dtype=torch.float64)), "x"),
        (dict(x=torch.randn(10, 4)), "x"),
        (dict(x=torch.randn(2, 0, 4)), "x"),
        (dict(x=torch.randn(2, 10, 4).masked_fill(torch.arange(4) == 2, math.nan)), "x"),
        (dict(x=torch.full((2, 10, 4), math.inf)), "x"),
        (dict(valid=torch.ones(2, 9, dtype=torch.bool)), "valid"),
        (dict(valid=torch.ones(2, 10)), "valid"),
        (dict(valid=torch.arange(10).expand(2, 10) < 2), "k"),  # k = 3 > 2 valid tokens
        (dict(impl="cuda"), "impl"),
        (dict(official_quirks=1), "official_quirks"),
        (dict(official_quirks=True, impl="triton"), "impl"),
    ],
)
@pytest.mark.parametrize("quirks", [False, True])
def test_bad_inputs(kwargs, param, quirks):
    args = dict(x=torch.randn(2, 10, 4), k=3, official_quirks=quirks)
    args.update(kwargs)
    with pytest.raises(ValueError, match=param):
        max_min_diversity(args.pop("x"), args.pop("k"), **args)


def test_cosine_distance_bad_input():
    with pytest.raises(ValueError, match="x"):
        cosine_distance(torch.tensor([[[math.nan, 1.0]]]))
