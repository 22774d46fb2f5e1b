"""The Qwen2.5-VL variant of the VLM test-bed (reproductions/testbeds/vlm_qwen.py): the processor's patch layout, the
merged-token-to-cell map, the cached training path against the model from pixels, the tower's MACs, a VLM method
through the seam; the shipped weights (checksum, loader, held-out accuracy, region probe) and the leaderboard on it."""

from __future__ import annotations

import functools

import pytest
import torch
from testbed_helpers import NEEDS_FASHION_MNIST, check_forward_through_seam

from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import vlm, vlm_qwen
from prunelab.reproductions.testbeds.shipped import sha256

pytestmark = NEEDS_FASHION_MNIST


@functools.cache
def _built():
    return vlm_qwen.build()


@functools.cache
def _trained():
    return vlm_qwen.load()


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return C.to_pixels(C.make_dataset("test", n, seed=seed).scenes.images(list(range(n))))


def test_patchify_is_the_processors_layout():
    import transformers as tf

    pixels = _pixels(2)
    processor = tf.Qwen2VLImageProcessor(patch_size=vlm_qwen.PATCH, merge_size=vlm_qwen.MERGE,
                                         temporal_patch_size=vlm_qwen.TEMPORAL, do_resize=False, do_rescale=False,
                                         do_normalize=False)
    out = processor(images=[p.numpy() for p in pixels], return_tensors="pt", input_data_format="channels_first")
    assert out["image_grid_thw"].tolist() == [list(vlm_qwen.GRID_THW)] * 2
    torch.testing.assert_close(vlm_qwen.patchify(pixels), out["pixel_values"], atol=0, rtol=0)
    with pytest.raises(ValueError, match="pixels"):
        vlm_qwen.patchify(pixels[:, :, :56])


def test_patch_cells_follow_the_grid():
    cells = vlm_qwen.patch_cells().view(6, 6)
    assert cells[:2, :2].eq(0).all() and cells[2:4, 4:].eq(5).all() and cells[4:, 2:4].eq(7).all()
    assert torch.bincount(cells.flatten()).tolist() == [4] * 9


def test_vocabulary_extends_the_llava_test_beds():
    words = vlm_qwen.vocabulary()
    assert words[:len(vlm.vocabulary())] == vlm.vocabulary()  # answers keep their ids
    start, end, video = vlm_qwen.vision_ids()
    assert [words[i] for i in (start, end, video)] == list(vlm_qwen.MARKERS)
    assert vlm.answer_ids(vlm_qwen.tokenizer()) == vlm.answer_ids(vlm.tokenizer())


@torch.no_grad()
def test_batch_and_forward_through_the_seam():
    model, tok = _built()
    x = check_forward_through_seam(vlm_qwen, model, tok, kept_at_quarter=9)
    assert x["mm_token_type_ids"].sum().item() == 3 * vlm_qwen.TOKENS and x["pixel_values"].shape == (3 * 144, 294)


@torch.no_grad()
def test_cached_forward_equals_the_model_from_pixels():
    """The training path (the merger's inputs cached, M-RoPE from the model's own code, padded prompts) gives the
    full model's logits."""
    model, tok = _built()
    data = C.make_dataset("test", 3, seed=4, kinds=("presence", "relation"))
    x = vlm_qwen.batch(data.samples, data.scenes, tok)
    full = model(**vlm_qwen.model_inputs(x)).logits
    states = vlm_qwen.tower_states(model, C.to_pixels(data.scenes.images([s.scene_index for s in data.samples])))
    assert states.shape == (3, 36, 4, 192)
    h = vlm_qwen.cached_forward(model, x, states).last_hidden_state
    valid = x["attention_mask"].bool()
    torch.testing.assert_close(model.lm_head(h)[valid], full[valid], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tower_macs_count_what_the_tower_runs():
    """The linear layers and the patch embedding as torch's FLOP counter sees them, plus the attention products it
    does not count on CPU: two full-attention blocks over 144 patches, two window blocks over windows of 64, 32, 32
    and 16 patches (8 x 8, 8 x 4, 4 x 8 and 4 x 4 of the 12 x 12 grid)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = _built()
    with FlopCounterMode(display=False) as counter:
        model.model.visual(vlm_qwen.patchify(_pixels(1)), grid_thw=torch.tensor([vlm_qwen.GRID_THW]))
    attention = 2 * 192 * (2 * 144 ** 2 + 2 * (64 ** 2 + 32 ** 2 + 32 ** 2 + 16 ** 2))
    assert vlm_qwen.tower_macs(model) == counter.get_total_flops() // 2 + attention


@pytest.mark.slow
def test_training_stages_lower_their_losses(capsys):
    from prunelab.reproductions.testbeds import train_vlm_qwen as T

    model, _ = vlm_qwen.build(seed=3)
    heads = T.pretrain_tower(model, steps=30, batch_size=16, scenes=500, log_every=0)
    first, last = sum(heads.losses[:5]) / 5, sum(heads.losses[-5:]) / 5
    assert last < first, (first, last)
    tower = {k: v.clone() for k, v in model.model.visual.state_dict().items() if not k.startswith("merger.")}
    losses = T.train_reading(model, steps=40, batch_size=8, scenes=200, log_every=20)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert "asked cell read at" in capsys.readouterr().out
    for k, v in model.model.visual.state_dict().items():  # the tower stays frozen, the merger trains
        if not k.startswith("merger."):
            assert torch.equal(v, tower[k]), k


def test_shipped_weights_match_their_checksum():
    assert vlm_qwen.WEIGHTS.is_file(), "the trained Qwen2.5-VL test-bed weights must ship with the repo"
    assert sha256(vlm_qwen.WEIGHTS) == vlm_qwen.SHA256
    assert vlm_qwen.WEIGHTS.stat().st_size < 20e6


def test_loader_refuses_other_weights(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad), metadata={"vocabulary": "\n".join(vlm.vocabulary())})
    with pytest.raises(ValueError, match="path"):
        vlm_qwen.load(bad)  # the LLaVA test-bed's vocabulary lacks the vision markers
    with pytest.raises(FileNotFoundError, match="path"):
        vlm_qwen.load(tmp_path / "missing.safetensors")


@torch.no_grad()
def test_trained_model_reads_its_image():
    """Every kind far above its majority answer (presence 0.50, location 0.20, count 0.49, relation 0.19) on held-out
    composites (the recorded accuracies are in reproductions/testbeds/README.md), and the answer's own cell matters
    more than as many random tokens."""
    from prunelab.reproductions.testbeds.train_vlm import evaluate
    from prunelab.reproductions.vlm_bench.bench import region_probe

    model, _ = _trained()
    data = C.make_dataset("test", 240, seed=11)
    acc = evaluate(model, data, testbed=vlm_qwen)
    assert acc["location"] > 0.85 and acc["relation"] > 0.6 and acc["count"] > 0.75 and acc["presence"] > 0.85, acc
    rows = {r["tokens"]: r for r in region_probe(model, data, batch_size=64, seed=0, testbed=vlm_qwen)}
    assert rows["intact"]["location"] == pytest.approx(acc["location"])
    assert rows["region removed"]["location"] < rows["random removed"]["location"] - 0.15, rows


def test_bench_runs_on_the_qwen_test_bed(tmp_path):
    from prunelab.reproductions.vlm_bench.bench import run_bench

    out = run_bench(tmp_path, ("random_prune", "divprune"), budgets=(0.25,), n=8, speed_batch=2, rounds=1,
                    compose=(), official=("flowcut",), testbed="qwen2_5_vl")
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"dense", "random", "DivPrune", "FlowCut (official quirks)"}
    assert rows["DivPrune"]["visual_%"] == pytest.approx(100 * 9 / 36)
    assert rows["FlowCut (official quirks)"]["lm_macs_%"] < 100 and "vs_random" in rows["FlowCut (official quirks)"]
    assert rows["DivPrune"]["lm_macs_%"] < 60 and rows["DivPrune"]["bound"] > 1
    assert "Qwen2.5-VL" in (tmp_path / "bench.md").read_text()
    with pytest.raises(ValueError, match="testbed"):
        run_bench(tmp_path, ("divprune",), n=8, testbed="llava_next")
    with pytest.raises(ValueError, match="official"):
        run_bench(tmp_path, ("random_prune",), budgets=(0.25,), n=8, compose=(), official=("random_prune",),
                  testbed="qwen2_5_vl")
