"""ToP-ViM's tiny preset on the shipped Vim test-bed: its tables, claims, timing and plot."""

from __future__ import annotations

import json

from prunelab.cli import main


def test_tiny_preset_writes_its_tables_claims_speed_and_curve(tmp_path):
    out = tmp_path / "out"
    main(["reproduce", "top_vim", "--out", str(out), "--n-test", "24", "--ratios", "0.8", "0.5", "--rounds", "1",
          "--timing-batch", "4", "--no-progress"])
    result = json.loads((out / "table.json").read_text())
    rows = {(r["model"], r["method"]): r for r in result["rows"]}
    dense = rows[("base", "dense")]
    assert {m for m, _ in rows} == {"base", "ft_dense", "ft_naive", "ft_top", "ft_random"}
    for key in (("base", "ToP-ViM"), ("base", "naive removal (ToP scores)"), ("ft_top", "ToP-ViM")):
        r = rows[key]
        assert r["gflops"] < dense["gflops"] and r["keep_ratio"] == 0.8
        assert "vs_random" in r and r["vs_random_se"] >= 0 and "vs_dense" in r
    # aligned modes are charged the scans' visits to pruned slots, removal is not
    assert rows[("base", "ToP-ViM")]["gflops"] > rows[("base", "naive removal (ToP scores)")]["gflops"]
    assert rows[("base", "random, aligned")]["gflops"] == rows[("base", "ToP-ViM")]["gflops"]
    assert rows[("base", "ToP-ViM gapped")]["gflops"] == rows[("base", "naive removal (ToP scores)")]["gflops"]
    assert all(0 <= r["top1"] <= 100 for r in rows.values())
    curve = json.loads((out / "curve.json").read_text())["rows"]
    assert {r["keep_ratio"] for r in curve} == {1.0, 0.8, 0.5}
    claims = json.loads((out / "claims.json").read_text())["rows"]
    assert len(claims) == 3 and all(isinstance(c["holds"], bool) for c in claims)
    speed = json.loads((out / "speed.json").read_text())["rows"]
    assert {r["alignment"] for r in speed} == {"none", "zero_slot", "decay_only", "gapped"}
    assert all(r["speedup"] > 0 and r["bound"] > 1 for r in speed)
    assert (out / "curve.png").stat().st_size > 0
    assert set(result["provenance"]["weights_sha256"]) == {"base", "ft_dense", "ft_naive", "ft_top", "ft_random"}
