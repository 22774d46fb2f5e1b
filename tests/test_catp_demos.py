"""CATP's reusable demonstration set: the demonstrations cached once through layer K (``common/vlm_prefix.py``), then
continued by queries, equal the whole prompts run at once."""

from __future__ import annotations

import pytest
import torch
from vlm_helpers import generate_tail

import prunelab
from prunelab.common.tiny_vlm import QWEN_IMAGE_TOKEN, QWEN_VISION_START, sample_inputs, tiny_inputs, tiny_vlm
from prunelab.common.vlm_plan import Needs, Stage, VLMPlan
from prunelab.methods.catp import CATP
from prunelab.methods.catp.demos import DemonstrationSet

TINY = {"layer": 1, "query_layer": 1}


@pytest.fixture(scope="module", params=["llava", "llava_next", "qwen2_5_vl"])
def setup(request):
    """(family, model, demonstrations [1 prompt, 2 images], queries [2 prompts, each from its image on], the whole
    prompts left-padded). Qwen2.5-VL's cut is after the query's ``<|vision_start|>``, so the demonstrations end
    with it."""
    family = request.param
    model = tiny_vlm(family)
    demos = tiny_inputs(model, family, [2], seed=3)
    q = tiny_inputs(model, family, [1, 1], padding_side="left", text_lens=[0, 0], seed=5)
    rows = [sample_inputs(q, b, [1, 1]) for b in range(2)]
    if family == "qwen2_5_vl":
        demos = _join(demos, {"input_ids": torch.tensor([[QWEN_VISION_START]])})
        rows = [{k: v[:, 1:] if k in SEQ else v for k, v in r.items()} for r in rows]
    return family, model, demos, _batch(rows), _batch([_join(demos, r) for r in rows])


SEQ = ("input_ids", "attention_mask", "mm_token_type_ids")  # per-token inputs; the others are per image


def _join(a: dict, b: dict) -> dict:
    """One prompt: ``a``'s tokens and images, then ``b``'s (both unpadded, batch 1)."""
    ids = torch.cat([a["input_ids"], b["input_ids"]], dim=1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in a:
        out["mm_token_type_ids"] = (ids == QWEN_IMAGE_TOKEN).long()
    for k in ("pixel_values", "image_sizes", "image_grid_thw"):
        if k in a:
            out[k] = _cat_images([a[k], b[k]]) if k in b else a[k]
    return out


def _cat_images(xs: list[torch.Tensor]) -> torch.Tensor:
    """Per-image inputs of prompts made apart; NeXT's pixel values [images, patches, ...] zero-padded to one patch
    count (the model reads each image's own patches by its size)."""
    if xs[0].dim() == 5:
        n = max(p.shape[1] for p in xs)
        xs = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, n - p.shape[1])) for p in xs]
    return torch.cat(xs)


def _batch(rows: list[dict]) -> dict:
    """Unpadded batch-1 prompts as one left-padded batch."""
    L = max(r["input_ids"].shape[1] for r in rows)
    out = {k: torch.cat([torch.nn.functional.pad(r[k], (L - r[k].shape[1], 0)) for r in rows]) for k in SEQ
           if k in rows[0]}
    for k in rows[0].keys() - set(SEQ):
        out[k] = _cat_images([r[k] for r in rows])
    return out


def _kept(handle):
    return [(name, [k.clone() for k in ks]) for name, ks in handle.state.history]


def _same(a, b) -> bool:
    """The same stages keeping the same tokens of the same images."""
    return [n for n, _ in a] == [n for n, _ in b] and all(
        len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y)) for (_, x), (_, y) in zip(a, b))


@torch.no_grad()
def test_reuse_equals_the_whole_prompts(setup):
    """Logits of every kept row, kept tokens of every stage and generated tokens, for two batches of queries after one
    cached demonstration set (the cache is never written by a query)."""
    family, model, demos, queries, whole = setup
    with prunelab.apply(model, CATP.for_model(model, ratio=0.6, **TINY)) as h:
        ref = model(**whole).logits
        ref_kept, ref_valid = _kept(h), h.state.prompt.llm_rows[-1].valid.clone()
        ref_tail = generate_tail(model, whole, n=4)
        cached = DemonstrationSet(h, **demos)
        assert cached.images == 2
        got = model(**cached.inputs(**queries)).logits
        assert torch.equal(h.state.prompt.llm_rows[-1].valid, ref_valid)
        assert _same(_kept(h), ref_kept)
        assert torch.equal(generate_tail(model, cached.inputs(**queries), n=4), ref_tail)
        alone = model(**cached.inputs(**sample_inputs(queries, 1, [1, 1]))).logits  # a second batch: query 1 alone
    torch.testing.assert_close(got[ref_valid], ref[ref_valid], atol=1e-4, rtol=1e-4)
    n = int(ref_valid[1].sum())
    torch.testing.assert_close(alone[0, -n:], ref[1, -n:], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_keep_all_reuse_is_the_dense_model(setup):
    family, model, demos, queries, whole = setup
    dense = model(**whole).logits
    with prunelab.apply(model, CATP.for_model(model, ratio=0.0, next_tokens="anyres", **TINY)) as h:
        got = model(**DemonstrationSet(h, **demos).inputs(**queries)).logits
    valid = whole["attention_mask"].bool()
    torch.testing.assert_close(got[:, -dense.shape[1]:][valid], dense[valid], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_bad_demonstrations_and_queries_are_named(setup):
    family, model, demos, queries, whole = setup
    with prunelab.apply(model, CATP.for_model(model, ratio=0.6, **TINY)) as h:
        with pytest.raises(ValueError, match="input_ids"):  # two prompts
            h.cache_prefix(**{k: torch.cat([v, v]) for k, v in demos.items()})
        with pytest.raises(ValueError, match="attention_mask"):  # padding
            h.cache_prefix(**{**demos, "attention_mask": torch.nn.functional.pad(demos["attention_mask"], (1, -1))})
        cached = DemonstrationSet(h, **demos)
        text_first = tiny_inputs(model, family, [1, 1], padding_side="left", seed=5)
        with pytest.raises(ValueError, match="input_ids"):  # text before the query's image
            cached.inputs(**text_first)
        with pytest.raises(ValueError, match="attention_mask"):  # a cache without the prefix rows in the mask
            model(**{**cached.inputs(**queries), "attention_mask": queries["attention_mask"]})
    with prunelab.apply(model, CATP.for_model(model, ratio=0.6, **TINY)):
        with pytest.raises(ValueError, match="past_key_values"):  # cached under another handle
            model(**cached.prefix.inputs(**queries))
    keep = lambda ctx: []  # noqa: E731
    for stage in (Stage("llm", keep, layer=1, needs=Needs(rows=("image",))), Stage("llm", keep, layer=-1)):
        with prunelab.apply(model, _Plan(stage)) as h, pytest.raises(ValueError, match="plan"):
            h.cache_prefix(**demos)


class _Plan:
    def __init__(self, *stages):
        self.stages = stages

    def vlm_plan(self):
        return VLMPlan(self.stages)


def test_reuse_table_on_the_trained_test_bed(tmp_path):
    """The measurement script end to end, small: reused CATP answers every query as whole-prompt CATP."""
    from prunelab.reproductions.catp.reuse import COLUMNS, reuse_table

    rows = reuse_table(tmp_path, shots=2, sets=1, queries=4, batch_size=2, repeats=1)
    by = {r["way"]: r for r in rows}
    assert list(by) == ["dense", "CATP", "CATP, reused"] and all(list(r) == COLUMNS for r in rows)
    assert by["CATP, reused"]["same_answer"] == 1.0
    assert by["CATP, reused"]["accuracy"] == by["CATP"]["accuracy"]
    assert (tmp_path / "reuse.md").read_text().count("CATP, reused") == 1
