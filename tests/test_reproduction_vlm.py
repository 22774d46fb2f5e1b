"""The DivPrune, HiPrune, FlowCut, VisionDrop and CATP reproductions: the shared tiny VLM preset through the CLI, the
full presets' honest stop, RandomPrune, and the papers' expected.yaml."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
import yaml

import prunelab
from prunelab.cli import main
from prunelab.common.tiny_vlm import tiny_inputs, tiny_vlm
from prunelab.methods.baselines import RandomPrune
from prunelab.reproductions.vlm_tiny import LABELS, MATCHED

PAPERS = ("divprune", "hiprune", "flowcut", "visiondrop", "catp")
FULL = ("divprune", "hiprune", "flowcut", "visiondrop", "catp")  # the papers with an lmms-eval full preset

REDUCED = ["--ratios", "0.111", "1.0", "--prompts", "1", "2", "--decode-steps", "2", "--warmup", "0", "--repeat", "1",
           "--testbed-n", "8"]
EXTRA = {"catp": ["--icl-n", "8", "--icl-shots", "2"]}  # CATP's in-context test-bed table, 8 prompts at 0 and 2 shots


@pytest.fixture(scope="module", params=PAPERS)
def tiny_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    assert main(["reproduce", request.param, "--out", str(out), *REDUCED, *EXTRA.get(request.param, [])]) == 0
    return request.param, out


def test_tiny_writes_tables_and_plot(tiny_run):
    paper, out = tiny_run
    for name in ("tiny.json", "tiny.md", "tiny_summary.json", "tiny_summary.md", "tiny.png", "testbed.json",
                 "testbed.md"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "tiny.md").read_text()
    assert "not task accuracy" in md and "- commit:" in md and "| family | method |" in md
    rows = json.loads((out / "tiny.json").read_text())["rows"]
    assert rows[1]["method"] == LABELS[paper]  # the paper's own method is listed first, after dense
    assert {r["family"] for r in rows} == {"llava", "llava_next", "qwen2_5_vl"}
    methods = importlib.import_module(f"prunelab.reproductions.{paper}.tiny").METHODS
    assert {r["method"] for r in rows} - {MATCHED} == {"dense", *(LABELS[m] for m in methods)}
    testbed = json.loads((out / "testbed.json").read_text())["rows"]  # accuracy on the trained test-bed VLM
    assert [(r["method"], r["keep_ratio"]) for r in testbed] == [("dense", 1.0)] + [
        (LABELS[m], ratio) for m in methods for ratio in (0.111, 1.0)]
    for r in testbed:
        if r["keep_ratio"] == 1.0 and r["method"] != "dense":  # every token kept: the dense answers
            assert r["mean"] == testbed[0]["mean"], r
    if paper == "catp":  # the in-context test-bed: dense at 0 and 2 shots, the methods at the paper's R
        icl = json.loads((out / "icl.json").read_text())["rows"]
        assert [(r["shots"], r["method"]) for r in icl[:2]] == [(0, "dense"), (2, "dense")]
        methods = {r["method"] for r in icl[2:]}
        assert methods == {"CATP", "DivPrune", "random", "DivPrune (matched)", "random (matched)"}
        assert {r["R"] for r in icl[2:]} == {0.667, 0.778, 0.899} and (out / "icl.png").stat().st_size > 0
        for r in icl[2:]:
            assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 8
            if r["method"] in ("DivPrune", "random"):
                assert abs(r["visual_%"] - 100 * (1 - r["R"])) < 4  # 1 - R of every image before layer 0
    for r in rows:  # random at the share the paper's method kept, where that differs from the keep ratio
        if r["method"] == MATCHED:
            own = next(o for o in rows if o["method"] == LABELS[paper] and o["family"] == r["family"]
                       and o["keep_ratio"] == r["keep_ratio"])
            assert abs(r["visual_mean"] - own["visual_mean"]) <= 0.1 * own["visual"] + 1


def test_tiny_dense_reference_and_costs(tiny_run):
    _, out = tiny_run
    rows = json.loads((out / "tiny.json").read_text())["rows"]
    for fam in ("llava", "llava_next", "qwen2_5_vl"):
        sub = [r for r in rows if r["family"] == fam]
        dense = next(r for r in sub if r["method"] == "dense")
        assert dense["kl"] == 0.0 and dense["agreement"] == 1.0 and dense["kept_visual"] == dense["visual"]
        for r in sub:
            assert r["kl"] >= 0.0 and 0.0 <= r["agreement"] <= 1.0 and r["ms"] > 0
            assert r["dense_macs_M"] == dense["macs_M"]
            assert r["kept_visual"] <= r["visual_mean"] <= r["visual"]
            if r["keep_ratio"] < 1:
                assert r["kept_visual"] < r["visual"]
                assert r["macs_M"] < dense["macs_M"] and r["kv_kB"] < dense["kv_kB"]
            else:  # every visual token kept (HiPrune keeps NeXT's newlines): the dense prefill
                assert r["kept_visual"] == r["visual"] and r["macs_M"] == dense["macs_M"]
            if r["keep_ratio"] == 1.0 and r["method"] in ("DivPrune", "HiPrune", "FlowCut", "VisionDrop", "CATP"):
                # float32 logits within 1e-5 of dense (the seam's keep-all invariant) give KL of order 1e-10
                assert r["kl"] < 1e-6 and r["agreement"] == 1.0, r


def test_full_preset_names_a_missing_checkpoint(tmp_path):
    pytest.importorskip("lmms_eval", reason="the eval extra (lmms-eval) is not installed")
    for paper in FULL:
        with pytest.raises(OSError, match="pretrained: cannot load"):
            main(["reproduce", paper, "--preset", "full", "--model", str(tmp_path / "absent"), "--out",
                  str(tmp_path), "--limit", "2", "--tasks", "pope"])


@pytest.mark.parametrize("paper", PAPERS)
def test_expected_yaml_has_sources(paper):
    path = Path(prunelab.__file__).parent.parent / "reproductions" / paper / "expected.yaml"
    expected = yaml.safe_load(path.read_text())
    assert expected and all(isinstance(v, dict) and v.get("source") and v.get("confidence") for v in expected.values())
    if paper == "divprune":
        rows = expected["llava15_7b_r0098"]["rows"]
        assert rows["divprune"]["pope_f1"] == 86.02 and rows["original"]["gqa"] == 61.96
    elif paper == "hiprune":
        assert expected["accuracy_kept_at_11pct"]["retained_accuracy_pct"] == 99.5
    elif paper == "flowcut":
        assert expected["llava15_7b_64_tokens"]["flowcut"]["gqa"] == 55.6
    elif paper == "catp":
        assert expected["llava_next_7b_4shot"]["rows"]["catp_r0778"]["avg_rel_pct"] == 100.1
    else:
        assert expected["llava15_7b_32_tokens"]["visiondrop"]["avg_retained_pct"] == 91.46
        assert expected["llava_next_7b_320_tokens"]["latency_speedup"] == 2.7


def test_random_prune_is_seeded_and_exact():
    model = tiny_vlm("llava")
    x = tiny_inputs(model, "llava", [1, 2])
    kept = []
    for seed in (0, 0, 1):
        with torch.no_grad(), prunelab.apply(model, RandomPrune(budget=0.25, seed=seed)) as h:
            model(**x)
        kept.append(h.state.kept)
    assert all(k.numel() == 4 for k in kept[0])  # 16 tokens per image, round half up
    assert all(torch.equal(a, b) for a, b in zip(kept[0], kept[1]))
    assert not all(torch.equal(a, b) for a, b in zip(kept[0], kept[2]))
    with torch.no_grad(), prunelab.apply(model, RandomPrune(budget=3)) as h:
        model(**x)
    assert [k.numel() for k in h.state.kept] == [3, 3, 3]  # a count is per image
    with pytest.raises(ValueError, match="budget"), torch.no_grad(), prunelab.apply(model, RandomPrune(budget=17)):
        model(**x)  # more than the 16 tokens of an image
    for bad in (0.0, 1.5, 0, -2, True, float("nan"), "3"):
        with pytest.raises(ValueError, match="budget"):
            RandomPrune(budget=bad)
