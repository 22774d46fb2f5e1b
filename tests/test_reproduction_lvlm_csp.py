"""LVLM_CSP's tiny preset through the CLI on the shipped tiny-LISA test-bed (a short run), and its expected.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from testbed_helpers import NEEDS_FASHION_MNIST

from prunelab.cli import main
from prunelab.methods.lvlm_csp import mean_image_tokens


@NEEDS_FASHION_MNIST
def test_tiny_preset_writes_the_segmentation_table(tmp_path):
    out = tmp_path / "out"
    assert main(["reproduce", "lvlm_csp", "--out", str(out), "--n", "8", "--settings", "short", "--rounds", "2",
                 "--batch-size", "4"]) == 0
    result = json.loads((out / "seg.json").read_text())
    rows = result["rows"]
    assert [r["method"] for r in rows[:2]] == ["dense", "text only"] and rows[0]["visual_%"] == 100.0
    csp = [r for r in rows if r["method"] == "LVLM_CSP"]
    assert [r["visual_%"] for r in csp] == pytest.approx([100 * mean_image_tokens(144, 16, 16, 1, 2, 4) / 144,
                                                          100 * mean_image_tokens(144, 32, 8, 1, 3, 4) / 144])
    for r in csp:  # each baseline at the LVLM_CSP setting's image tokens per layer (equal image-token FLOPs)
        for name in ("[SEG] one-stage", "random"):
            base = [b for b in rows if b["method"] == name and r["setting"] in b["setting"]]
            assert len(base) == 1 and abs(base[0]["visual_%"] - r["visual_%"]) < 100 / 144, (name, r["setting"])
    assert all(0.0 <= r["giou"] <= 1.0 and 0.0 <= r["ciou"] <= 1.0 and r["n"] == 8 for r in rows)
    assert (out / "seg.png").stat().st_size > 0 and "lisa.safetensors" in result["provenance"]["model"]
    assert "- commit:" in (out / "seg.md").read_text()
    speed = json.loads((out / "speed.json").read_text())["rows"]
    assert [r["method"] for r in speed] == ["dense", "LVLM_CSP", "[SEG] one-stage"]
    assert abs(speed[1]["lm_macs_%"] - speed[2]["lm_macs_%"]) < 1.0 and speed[1]["lm_macs_%"] < 50  # equal FLOPs
    assert all(r["ms"] > 0 and r["speedup"] > 0 and r["rounds"] == 2 for r in speed)


def test_expected_yaml_has_the_abstract_claims():
    path = Path(__file__).resolve().parents[1] / "reproductions" / "lvlm_csp" / "expected.yaml"
    data = yaml.safe_load(path.read_text())
    claims = data["lisa_7b_image_token_flops"]
    assert claims["source"].startswith("paper, abstract") and claims["confidence"] == "high"
    assert {r["image_token_flops_reduction_pct"] for r in claims["rows"].values()} == {65, 70}


def test_full_preset_is_refused_by_name():
    with pytest.raises(SystemExit):
        main(["reproduce", "lvlm_csp", "--preset", "full"])
