"""DToP's reproductions: the tiny preset on the shipped test-bed and the full preset on a fake ADE20K folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prunelab.cli import main
from prunelab.reproductions.dtop import full
from prunelab.reproductions.dtop.tiny import random_rates


def test_random_rates_turn_shares_of_all_tokens_into_shares_of_the_active_ones():
    assert random_rates([0.5, 0.25, 0.25]) == (0.5, 0.5)
    assert random_rates([0.0, 0.0, 1.0]) == (0.0, 0.0)
    assert random_rates([1.0, 0.0, 0.0]) == (1.0, 0.0)


def test_tiny_preset_writes_its_table_speed_and_curve(tmp_path):
    out = tmp_path / "out"
    main(["reproduce", "dtop", "--out", str(out), "--n-test", "40", "--p0", "0.9", "--bootstrap", "20",
          "--rounds", "2", "--timing-batch", "4", "--no-progress"])
    result = json.loads((out / "table.json").read_text())
    rows = result["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [
        ("base", "dense"), ("fine-tuned", "dense (no exit)"), ("base", "DToP"), ("base", "random exit"),
        ("fine-tuned", "DToP"), ("fine-tuned", "random exit")]
    for dtop, rand in ((rows[2], rows[3]), (rows[4], rows[5])):
        assert dtop["gflops"] < rows[0]["gflops"]
        assert abs(rand["gflops"] - dtop["gflops"]) < 0.03 * rows[0]["gflops"]  # the same average cost
        assert "vs_random" in dtop and dtop["vs_random_se"] > 0
    assert all(0 <= r["miou"] <= 100 and r["miou_se"] > 0 for r in rows)
    speed = json.loads((out / "speed.json").read_text())["rows"]
    assert {r["method"] for r in speed} == {"DToP", "random exit"} and all(r["speedup"] > 0 for r in speed)
    assert (out / "curve.png").stat().st_size > 0 and result["provenance"]["weights_sha256"]["dtop"]
    exits = json.loads((out / "exits.json").read_text())["rows"]
    kinds = {(m, c) for m in ("base", "fine-tuned") for c in ("easy", "hard")}
    assert {(r["model"], r["canvases"]) for r in exits} == kinds
    assert all(abs(r["stage1_%"] + r["stage2_%"] + r["last_%"] - 100) < 1e-4 for r in exits)  # float32 means


def test_expected_yaml_has_the_readme_rows_and_sources():
    exp = full.expected()
    assert exp["vit_b"]["dense"] == {"miou": 49.6, "gflops": 109.9} and exp["vit_b"]["dtop"]["gflops"] == 86.8
    assert exp["vit_l"]["dtop"] == {"miou": 52.8, "gflops": 412.8} and exp["vit_l"]["source"]


def test_full_preset_configs_match_the_official_ones():
    assert full.CONFIGS["vit_b"]["stage_ends"] == (5, 7, 11) and full.CONFIGS["vit_b"]["p0"] == 0.9
    assert full.CONFIGS["vit_l"]["stage_ends"] == (7, 15, 23) and full.CONFIGS["vit_l"]["crop"] == 640


def _fake_ade20k(root, n=2, split="validation"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for kind in ("images", "annotations"):
        (root / kind / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (40, 60) if i == 0 else (70, 50)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
        Image.fromarray(rng.integers(0, 151, (h, w), dtype=np.uint8)).save(
            root / "annotations" / split / f"ADE_{split}_{i:08d}.png")


def test_full_preset_pipeline_on_a_fake_ade20k(tmp_path):
    _fake_ade20k(tmp_path / "ade")
    out = tmp_path / "out"
    main(["reproduce", "dtop", "--preset", "full", "--ade20k", str(tmp_path / "ade"), "--model", "smoke",
          "--no-pretrained", "--p0", "0.0", "--k", "1", "--out", str(out), "--no-progress"])
    result = json.loads((out / "table.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    # (on this 4-block encoder the 150-query ATM heads outweigh the blocks, so exits need not save FLOPs)
    assert set(rows) == {"dense", "DToP"} and rows["DToP"]["gflops"] != rows["dense"]["gflops"]
    assert all(0 <= r["miou"] <= 100 for r in rows.values()) and result["provenance"]["n_images"] == 2


def test_full_preset_needs_a_checkpoint_or_no_pretrained(tmp_path):
    _fake_ade20k(tmp_path / "ade", n=1)
    with pytest.raises(SystemExit, match="--checkpoint"):
        main(["reproduce", "dtop", "--preset", "full", "--ade20k", str(tmp_path / "ade"), "--out", str(tmp_path)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--ade20k"):
        main(["reproduce", "dtop", "--preset", "full", "--ade20k", str(tmp_path / "empty"), "--no-pretrained",
              "--model", "smoke", "--out", str(tmp_path)])


def test_training_both_stages_then_evaluating_on_a_fake_ade20k(tmp_path):
    from prunelab.reproductions.dtop import train

    ade = tmp_path / "ade"
    _fake_ade20k(ade, n=3, split="training")
    _fake_ade20k(ade, n=1)
    common = ["--ade20k", str(ade), "--model", "smoke", "--iters", "2", "--batch", "2", "--workers", "0",
              "--out", str(tmp_path / "ckpt"), "--no-progress"]
    base = train.main([*common, "--stage", "base"])
    tuned = train.main([*common, "--stage", "dtop", "--init", str(base), "--p0", "0.0"])
    assert base.name == "smoke-base.safetensors" and tuned.name == "smoke-dtop.safetensors"
    assert train.lr_factor(0, 100) == pytest.approx(1e-6) and train.lr_factor(1500, 40000) == pytest.approx(1.0)
    assert train.lr_factor(40000, 40000) == 0.0
    main(["reproduce", "dtop", "--preset", "full", "--ade20k", str(ade), "--model", "smoke", "--checkpoint",
          str(tuned), "--out", str(tmp_path / "out"), "--no-progress"])
    rows = json.loads((tmp_path / "out" / "table.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "DToP"]
