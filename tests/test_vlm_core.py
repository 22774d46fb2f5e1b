"""The VLM seam on tiny random LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL models (prunelab.common.vlm)."""

from __future__ import annotations

import pytest
import torch
from vlm_helpers import generate_tail

from prunelab.common.handle import UnsupportedModelError
from prunelab.common.reduction import Reduction
from prunelab.common.tiny_vlm import sample_inputs, tiny_inputs, tiny_vlm
from prunelab.common.vlm import VLMRequest, install_vlm, is_hf_vlm
from prunelab.common.vlm_layout import find_image_spans

RAGGED = [1, 2]


class KeepAll:
    def vlm_select(self, ctx):
        return [Reduction(img.token_ids.new_tensor(range(img.embeds.shape[0]))[None], img.embeds.shape[0])
                for img in ctx.images]


class EveryOther:
    """Keeps visual tokens 0, 2, 4, ... of each image; optionally again after LM layer ``llm_layer``."""

    def __init__(self, llm_layer=None, vision=False):
        self.llm_layer, self.vision, self.seen = llm_layer, vision, []

    def vlm_request(self):
        return VLMRequest(vision_layers=(1,) if self.vision else (), received=self.vision, hidden=self.vision,
                          prune_projector=True, llm_layer=self.llm_layer)

    def vlm_budget(self, img, stage):
        return (img.embeds.shape[0] + 1) // 2

    def vlm_select(self, ctx):
        self.seen.append(ctx)
        return [Reduction(torch.arange(0, img.embeds.shape[0], 2)[None], img.embeds.shape[0]) for img in ctx.images]


class Budget(KeepAll):
    def __init__(self, k):
        self.k = k

    def vlm_budget(self, img, stage):
        return self.k






@pytest.mark.parametrize("side", ["left", "right"])
def test_spans_follow_the_image_tokens(family_model, side):
    family, model = family_model
    x = tiny_inputs(model, family, [2, 1, 0], padding_side=side)
    spans = find_image_spans(model, family, x["input_ids"], x["attention_mask"], x.get("image_sizes"),
                             x.get("image_grid_thw"))
    assert [s.sample for s in spans] == [0, 0, 1] and [s.image for s in spans] == [0, 1, 2]
    tok = model.config.image_token_id
    for b in range(3):
        mine = torch.cat([s.positions for s in spans if s.sample == b] or [torch.empty(0, dtype=torch.long)])
        assert torch.equal(mine, (x["input_ids"][b] == tok).nonzero().flatten())
    if family == "llava_next":  # different image sizes give different tile grids and newline counts
        assert len({s.num_tokens for s in spans}) > 1
        assert all(int(s.newline.sum()) > 0 and not s.newline[:s.base_tokens].any() for s in spans)


def test_keep_all_is_dense(family_model):
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED, padding_side="left")
    with torch.no_grad():
        dense = model(**x).logits
        with install_vlm(model, KeepAll()):
            kept = model(**x).logits
    torch.testing.assert_close(kept, dense, atol=1e-5, rtol=0)


def test_keep_all_with_vision_stats_is_dense(family_model):
    """Vision statistics through attention_received leave the tower's output unchanged (fp32)."""
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED)

    class Stats(KeepAll):
        def vlm_request(self):
            return VLMRequest(vision_layers=(1,), received=True, hidden=True)

        def vlm_select(self, ctx):
            self.ctx = ctx
            return super().vlm_select(ctx)

    m = Stats()
    with torch.no_grad():
        dense = model(**x).logits
        with install_vlm(model, m):
            kept = model(**x).logits
    torch.testing.assert_close(kept, dense, atol=1e-5, rtol=0)
    heads = (model.config.vision_config.num_heads if family == "qwen2_5_vl"
             else model.config.vision_config.num_attention_heads)
    for img in m.ctx.images:
        g = img.received[1]
        # per head, mean attention received over all queries: each query's row sums to 1, so per head the means
        # sum to ~1 over keys
        if family == "qwen2_5_vl":
            assert g.shape == (heads, img.span.num_tokens, 4)  # [H, N, 2x2 merge unit]
            # layer 1 is a full-attention block: one softmax over the image
            torch.testing.assert_close(g.sum((1, 2)), torch.ones(heads), atol=1e-4, rtol=0)
            assert bool((g > 0).all())
        else:
            assert g.dim() == 3 and g.shape[1:] == (heads, img.span.grid[0] * img.span.grid[1])
            assert bool((g.sum(-1) < 1.0).all()) and bool((g > 0).all())  # the CLS column is excluded


def _dense_masked_logits(model, family, x, kept_positions):
    """Dense model with the dropped visual tokens masked out instead of removed, at the specified positions."""
    mask = torch.zeros_like(x["attention_mask"])
    for b, pos in enumerate(kept_positions):
        mask[b, pos] = 1
    if family == "qwen2_5_vl":
        pos3, _ = model.model.get_rope_index(x["input_ids"], image_grid_thw=x["image_grid_thw"],
                                             attention_mask=x["attention_mask"],
                                             mm_token_type_ids=x["mm_token_type_ids"])
        position_ids = pos3  # kept tokens keep their own M-RoPE ids
    else:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # contiguous over the kept tokens
    y = {**x, "attention_mask": mask, "position_ids": position_ids}
    return model(**y).logits


@pytest.mark.parametrize("side", ["left", "right"])
def test_pruned_positions_and_logits(family_model, side):
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED, padding_side=side)
    with torch.no_grad(), install_vlm(model, EveryOther()) as h:
        pruned = model(**x).logits
        positions = h.state.positions
    tok = model.config.image_token_id
    kept = [positions[b][positions[b] >= 0] for b in range(2)]
    for b in range(2):  # text kept in order, exactly half (rounded up) of each image's visual tokens kept
        ids = x["input_ids"][b]
        valid = x["attention_mask"][b].bool()
        assert torch.equal(kept[b][ids[kept[b]] != tok], ((ids != tok) & valid).nonzero().flatten())
    with torch.no_grad():
        ref = _dense_masked_logits(model, family, x, kept)
    for b in range(2):
        got = pruned[b][positions[b] >= 0]
        torch.testing.assert_close(got, ref[b, kept[b]], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_batch_matches_per_sample(family_model, side):
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED, padding_side=side)
    for method in (KeepAll(), EveryOther()):
        with install_vlm(model, method):
            batch = generate_tail(model, x)
            singles = torch.cat([generate_tail(model, sample_inputs(x, b, RAGGED)) for b in range(2)])
        assert torch.equal(batch, singles), type(method).__name__
    # pruning changes what the model sees: the greedy continuation is not the dense one for some sample
    with install_vlm(model, EveryOther()):
        pruned_first = model(**x).logits[:, -1]
    assert not torch.allclose(pruned_first, model(**x).logits[:, -1], atol=1e-3)


def test_prune_after_llm_layer(family_model):
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED, padding_side="left")
    m = EveryOther(llm_layer=0)
    with install_vlm(model, m) as h:
        with torch.no_grad():
            out = model(**x)
        after = [len(k) for k in h.state.kept]
        positions = h.state.positions
        batch = generate_tail(model, x)
        singles = torch.cat([generate_tail(model, sample_inputs(x, b, RAGGED)) for b in range(2)])
    spans = m.seen[0].images
    assert [c.stage for c in m.seen[:2]] == ["projector", "llm"] and m.seen[1].layer == 0
    assert after == [(((s.span.num_tokens + 1) // 2) + 1) // 2 for s in spans]  # halved twice
    assert out.logits.shape[1] == positions.shape[1] and out.past_key_values.layers[0].keys.shape[2] > \
        out.past_key_values.layers[1].keys.shape[2]  # layers after K cache fewer rows
    assert torch.equal(batch, singles)


def test_bad_inputs_raise(family_model):
    family, model = family_model
    x = tiny_inputs(model, family, RAGGED)
    n_min = min(len(s.positions) for s in find_image_spans(model, family, x["input_ids"], x["attention_mask"],
                                                          x.get("image_sizes"), x.get("image_grid_thw")))
    for k in (0, 10_000):
        with install_vlm(model, Budget(k)), pytest.raises(ValueError, match="keep: budget"):
            model(**x)
    assert n_min >= 1
    text = tiny_inputs(model, family, [0, 0])
    with install_vlm(model, KeepAll()), pytest.raises(ValueError, match="input_ids: no image token|pixel_values"):
        model(**text)
    with pytest.raises(ValueError, match=r"layer: LLM stages after layers \[99\]"):
        install_vlm(model, EveryOther(llm_layer=99))


def test_unsupported_model_and_remove():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    assert not is_hf_vlm(llama)
    with pytest.raises(UnsupportedModelError, match="model:"):
        install_vlm(llama, KeepAll())
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", RAGGED)
    with torch.no_grad():
        before = model(**x).logits
        h = install_vlm(model, EveryOther(vision=True))
        model(**x)
        h.remove()
        after = model(**x).logits
    assert torch.equal(before, after) and model.config.vision_config._attn_implementation == "sdpa"


class NegativeStats(EveryOther):
    """Asks for the last vision block twice, as -1 and as its 0-based index, with hidden states and received."""

    def vlm_request(self):
        return VLMRequest(vision_layers=(-1, self.last), received=True, hidden=True)


def test_negative_vision_layers_keep_their_keys(family_model):
    family, model = family_model
    from prunelab.common.vlm_vision import vision_layers

    m = NegativeStats()
    m.last = len(vision_layers(model, family)) - 1
    x = tiny_inputs(model, family, RAGGED)
    with torch.no_grad(), install_vlm(model, m):
        model(**x)
    for img in m.seen[0].images:
        assert set(img.received) == set(img.hidden) == {-1, m.last}
        assert torch.equal(img.received[-1], img.received[m.last])
        assert torch.equal(img.hidden[-1], img.hidden[m.last])
    far = NegativeStats()
    far.last = -99
    with pytest.raises(ValueError, match=r"vision_layers: \[-99\]"):
        install_vlm(model, far)


def test_next_generate_with_vision_stats_and_remove():
    """generate() drops image_sizes on NeXT; the seam's get_image_features wrapper recovers them, exactly."""
    model = tiny_vlm("llava_next")
    x = tiny_inputs(model, "llava_next", RAGGED, padding_side="left")
    with torch.no_grad():
        before = model(**x).logits
    m = EveryOther(vision=True)
    with install_vlm(model, m) as h:
        assert "get_image_features" in vars(model.model)
        with torch.no_grad():
            model(**x)  # a plain forward: image_sizes in the call
        forward_ctx = m.seen[-1]
        batch = generate_tail(model, x)
        gen_ctx = m.seen[-1]
        singles = torch.cat([generate_tail(model, sample_inputs(x, b, RAGGED)) for b in range(2)])
    assert torch.equal(batch, singles)
    for a, b in zip(forward_ctx.images, gen_ctx.images):  # generate's spans and stats = the forward's
        assert a.span.tiles == b.span.tiles is not None and torch.equal(a.span.positions, b.span.positions)
        torch.testing.assert_close(a.received[1], b.received[1], atol=0, rtol=0)
    assert "get_image_features" not in vars(model.model) and h.state.encoded is None
    with torch.no_grad():
        assert torch.equal(model(**x).logits, before)


def test_next_crop_grid_places_every_cell_on_a_span_token():
    """The NeXT geometry: stitched crop patches land on the span's non-newline tokens, row by row, exactly once."""
    from prunelab.common.vlm_layout import crop_grid

    model = tiny_vlm("llava_next")
    x = tiny_inputs(model, "llava_next", RAGGED)
    spans = find_image_spans(model, "llava_next", x["input_ids"], x["attention_mask"], x["image_sizes"])
    v = model.config.vision_config
    for span, size in zip(spans, x["image_sizes"].tolist()):
        from prunelab.common.hf import llava_next_tiles

        crops = llava_next_tiles(size, model.config.image_grid_pinpoints, v.image_size) - 1
        grid = crop_grid(span, crops)
        index = grid.index()
        cells = torch.zeros(span.num_tokens, dtype=torch.bool)
        cells[index] = True
        assert torch.equal(cells[span.base_tokens:], ~span.newline[span.base_tokens:])  # every patch token, once
        assert index.unique().numel() == index.numel() == grid.height * grid.width
        # stitching the crops' own patch coordinates gives a raster of the unpadded window
        rows, cols = grid.tiles
        coords = torch.stack(torch.meshgrid(torch.arange(rows * grid.side), torch.arange(cols * grid.side),
                                            indexing="ij"), -1)  # [R, C, 2] (row, col) of each patch
        per_crop = coords.view(rows, grid.side, cols, grid.side, 2).permute(0, 2, 1, 3, 4).reshape(
            rows * cols, grid.side * grid.side, 2)
        stitched = grid.stitch(per_crop).view(grid.height, grid.width, 2)
        assert torch.equal(stitched[..., 0], torch.arange(grid.top, grid.top + grid.height)[:, None].expand(-1,
                                                                                                    grid.width))
        assert torch.equal(stitched[..., 1], torch.arange(grid.left, grid.left + grid.width).expand(grid.height, -1))
    with pytest.raises(ValueError, match="image_sizes"):
        crop_grid(spans[0], 99)
