"""The kept-token contract: Reduction (gather, merge, scatter, composition, layout) and check_reduction."""

from __future__ import annotations

import pytest
import torch

from prunelab.common.reduction import Merge, Reduction, check_reduction
from prunelab.common.tokens import TokenLayout


def test_gather_applies_one_step_to_every_tensor_of_the_sequence():
    x = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    pos = torch.arange(6).expand(2, 6)
    red = Reduction(torch.tensor([[0, 2, 5], [1, 3, 4]]), 6)
    hx, hp = red.apply(x, pos)
    assert torch.equal(hx, torch.stack([x[0, [0, 2, 5]], x[1, [1, 3, 4]]]))
    assert torch.equal(hp, red.keep)
    rope = torch.randn(1, 6, 4)  # shared across the batch: broadcast, not indexed by row
    assert torch.equal(red.gather(rope), torch.stack([rope[0, [0, 2, 5]], rope[0, [1, 3, 4]]]))
    heads = torch.randn(2, 4, 6, 8)  # [B, H, N, d]: the sequence along dim 2
    torch.testing.assert_close(red.gather(heads, dim=2)[1, :, 0], heads[1, :, 1], atol=0, rtol=0)


def test_keep_all_is_the_identity_and_returns_the_same_tensor():
    x = torch.randn(2, 5, 3)
    red = Reduction.keep_all(2, 5)
    assert red.is_identity and red.gather(x) is x
    check_reduction(red)


def test_scatter_inverts_gather_and_skips_padding_slots():
    x = torch.randn(2, 6, 3)
    red = Reduction(torch.tensor([[0, 2, 5], [1, 4, 4]]), 6, valid=torch.tensor([[True] * 3, [True, True, False]]))
    check_reduction(red)
    canvas = red.scatter(torch.zeros_like(x), red.gather(x))
    assert torch.equal(canvas[0, [0, 2, 5]], x[0, [0, 2, 5]]) and torch.equal(canvas[1, [1, 4]], x[1, [1, 4]])
    assert int((canvas != 0).any(-1).sum()) == 5
    assert red.counts.tolist() == [3, 2]


def test_merge_folds_dropped_tokens_into_their_targets():
    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    merge = Merge(src=torch.tensor([[1, 3]]), dst=torch.tensor([[0, 0]]), weight=torch.tensor([[1.0, 0.0]]))
    red = Reduction(torch.tensor([[0, 2]]), 4, merge=merge)
    check_reduction(red)
    out = red.gather(x)
    assert out[0, :, 0].tolist() == [1.5, 4.0]  # (1 + 2) / 2; the zero-weight entry is ignored


def test_a_summing_merge_adds_the_weighted_members_to_the_target():
    """VisionDrop's contextual token: the target plus the mean of its members (weights 1 / members)."""
    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    merge = Merge(torch.tensor([[1, 3]]), torch.tensor([[0, 0]]), torch.tensor([[0.5, 0.5]]), average=False)
    out = Reduction(torch.tensor([[0, 2]]), 4, merge=merge).gather(x)
    assert out[0, :, 0].tolist() == [1.0 + (2.0 + 8.0) / 2, 4.0]


def test_two_steps_compose_into_indices_of_the_original():
    first = Reduction(torch.tensor([[0, 2, 3, 5]]), 6)
    second = Reduction(torch.tensor([[1, 3]]), 4)
    both = first.then(second)
    x = torch.randn(1, 6, 2)
    assert torch.equal(both.gather(x), second.gather(first.gather(x)))
    assert both.keep.tolist() == [[2, 5]]
    with pytest.raises(ValueError, match="reduces 3"):
        first.then(Reduction(torch.tensor([[0]]), 3))


def test_layout_follows_a_protected_token_in_the_middle():
    layout = TokenLayout(7, protected=(3,), class_positions=(3,), grid=(2, 3))  # Vim: CLS in the middle
    red = Reduction(torch.tensor([[0, 3, 5], [1, 3, 6]]), 7)
    check_reduction(red, layout=layout)
    after = red.layout_after(layout)
    assert after.protected == (1,) and after.class_positions == (1,) and after.num_tokens == 3
    with pytest.raises(ValueError, match="not a prefix"):
        _ = layout.num_prefix
    with pytest.raises(ValueError, match=r"protected tokens \[3\]"):
        check_reduction(Reduction(torch.tensor([[0, 2, 5]]), 7), layout=layout)


@pytest.mark.parametrize("red, msg", [
    (Reduction(torch.tensor([[0, 2, 1]]), 5), "sorted"),
    (Reduction(torch.tensor([[0, 1, 1]]), 5), "sorted"),
    (Reduction(torch.tensor([[0, 2, 9]]), 5), "outside"),
    (Reduction(torch.tensor([[0, 2, 3]], dtype=torch.int32), 5), "int64"),
    (Reduction(torch.tensor([[0, 2, 3]]), 4), "reduces 4 tokens"),
    (Reduction(torch.tensor([[0, 2, 3]]), 5, valid=torch.tensor([[True, False, True]])), "come first"),
    (Reduction(torch.tensor([[0, 2]]), 5, merge=Merge(torch.tensor([[2]]), torch.tensor([[0]]),
                                                      torch.tensor([[1.0]]))), "also kept"),
    (Reduction(torch.tensor([[0, 2]]), 5, merge=Merge(torch.tensor([[1]]), torch.tensor([[2]]),
                                                      torch.tensor([[1.0]]))), "out of range"),
    (Reduction(torch.tensor([[0, 2]]), 5, merge=Merge(torch.tensor([[1]]), torch.tensor([[0]]),
                                                      torch.tensor([[float("nan")]]))), "finite"),
])
def test_contract_breaks_are_named(red, msg):
    with pytest.raises(ValueError, match=msg):
        check_reduction(red, 5, layout=TokenLayout.prefix(1, (0,), (2, 2)), name="keep")


def test_layout_validation_names_the_field():
    with pytest.raises(ValueError, match="protected"):
        TokenLayout(4, protected=(2, 1), class_positions=(), grid=(1, 2))
    with pytest.raises(ValueError, match="class_positions"):
        TokenLayout(4, protected=(0,), class_positions=(1,), grid=(1, 3))
