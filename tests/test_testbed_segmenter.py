"""The segmentation test-bed: canvases and masks correct by construction, the shipped weights and their loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunelab.reproductions.testbeds import scenes, segmenter


@pytest.mark.parametrize("hard", [False, True])
def test_the_mask_marks_exactly_the_garment_pixels(hard):
    # one all-white garment of class 3: after resizing it is exactly 1.0, brighter than any background or clutter
    images, labels = np.full((1, 28, 28), 255, dtype=np.uint8), np.array([3])
    for seed in range(20):
        canvas, mask = scenes.render(np.random.default_rng(seed), images, labels, hard)
        assert canvas.shape == mask.shape == (scenes.SIZE, scenes.SIZE)
        assert set(np.unique(mask)) <= {3, scenes.BACKGROUND}
        np.testing.assert_array_equal(mask == 3, canvas > 0.999)
        assert (mask == 3).sum() >= (scenes.HARD if hard else scenes.EASY)["scale"][0] ** 2


def test_canvases_are_deterministic_and_the_splits_differ():
    a = scenes.make_canvases("test", 12, seed=3)
    b = scenes.make_canvases("test", 12, seed=3)
    c = scenes.make_canvases("train", 12, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (12, 1, 48, 48) and a.masks.dtype == torch.int64 and a.hard.dtype == torch.bool
    assert a.masks.min() >= 0 and a.masks.max() <= scenes.BACKGROUND
    # hard canvases hold more garments, so more labelled regions per image
    many = scenes.make_canvases("test", 200, seed=0)
    regions = torch.tensor([len(m.unique()) for m in many.masks]).float()
    assert regions[many.hard].mean() > regions[~many.hard].mean() + 1


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="hard_share"):
        scenes.make_canvases("test", 4, hard_share=1.5)
    with pytest.raises(ValueError, match="n"):
        scenes.make_canvases("test", 0)
    with pytest.raises(ValueError, match="split"):
        scenes.make_canvases("val", 4)
    with pytest.raises(ValueError, match="stage"):
        segmenter.load("final")


@pytest.mark.parametrize("stage", ["base", "dtop"])
def test_shipped_weights_match_their_checksum(stage):
    assert segmenter.shipped.sha256(segmenter.WEIGHTS[stage]) == segmenter.SHA256[stage]


def test_a_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(segmenter.SHA256, "base", "0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        segmenter.load("base")
    with pytest.raises(FileNotFoundError, match="train them"):
        segmenter.load("base", tmp_path / "missing.safetensors")


def test_the_shipped_segmenter_segments_held_out_canvases():
    model, info = segmenter.load("base")
    data = scenes.make_canvases("test", 100, seed=5)
    scores = segmenter.evaluate(model, data)
    everything_background = segmenter.miou(segmenter.confusion(torch.full_like(data.masks, 10), data.masks))
    assert scores["miou"] > 3 * everything_background
    assert info["stage"] == "base" and abs(scores["miou"] - info["test"]["miou"]) < 5  # as recorded, on other canvases


def test_save_load_round_trip_is_exact(tmp_path):
    cfg = segmenter.SegConfig(embed_dim=32, depth=2, num_heads=2, stage_ends=(0, 1))
    torch.manual_seed(0)
    model = segmenter.build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    path = tmp_path / "s.safetensors"
    segmenter.save(model, {"config": {**cfg.__dict__}, "stage": "base"}, path)
    loaded, info = segmenter.load("base", path)
    x = scenes.make_canvases("test", 3, seed=0).images
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert info["stage"] == "base"


@pytest.mark.slow
def test_a_short_training_lowers_the_loss():
    cfg = segmenter.SegConfig(canvases=640, batch_size=32)
    _, info = segmenter.train(cfg, progress=False)
    first, last = info["loss_first_last_50"]
    assert last < 0.8 * first
