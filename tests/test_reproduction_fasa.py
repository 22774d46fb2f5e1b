"""The FASA reproduction: CLI, LongBench metrics, the full preset on a local tiny model, SmolLM2 smoke test."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from decoder_models import tiny_decoder

import prunelab
from prunelab.cli import main
from prunelab.reproductions.fasa import full, longbench


def test_cli_shows_fasa_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "fasa", "--help"])
    assert exc.value.code == 0 and "--passkey-contexts" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["reproduce", "fasa", "--preset", "full", "--help"])
    assert "--longbench" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["calibrate", "fasa", "--help"])
    assert "--fc-layout" in capsys.readouterr().out


def test_expected_yaml_has_the_abstract_claims():
    exp = full.expected()
    assert exp["longbench_v1"]["budget"] == 256 and exp["aime24"]["speedup"] == 2.56
    assert exp["aime24"]["cache_fraction"] == 0.189 and exp["longbench_v1"]["source"]


def test_longbench_metrics_on_hand_made_cases():
    assert longbench.score_one("qa_f1", "The Eiffel tower!", "eiffel tower") == 1.0
    p, r = 1 / 3, 1 / 2  # "tower" is 1 of 3 predicted and 1 of 2 reference tokens
    assert longbench.score_one("qa_f1", "tower of pisa", "eiffel tower") == pytest.approx(2 * p * r / (p + r))
    assert longbench.score_one("rouge", "a b c d", "a c d") == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert longbench.score_one("classification", "It is sports news", "sports", ["sports", "news"]) == 0.5
    assert longbench.score_one("retrieval", "Paragraph 7", "Paragraph 7") == 1.0
    assert longbench.score_one("count", "There are 12 and 13", "12") == 0.5
    assert longbench.score_one("code_sim", "x = 1\n", "x = 1") == 1.0
    assert longbench.truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    with pytest.raises(ValueError, match="metric"):
        longbench.score_one("bleu", "a", "a")


@pytest.fixture
def local_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(90)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", "[PAD]", *words])}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[PAD]")
    model = tiny_decoder("qwen2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "tokenizer")  # its own folder: next to a qwen2 config, the qwen2 class would load
    g = torch.Generator().manual_seed(0)
    text = lambda n: " ".join(words[i] for i in torch.randint(0, 90, (n,), generator=g).tolist())
    data = tmp_path / "longbench"
    data.mkdir()
    for task in ("qasper", "trec"):
        rows = [{"context": text(90), "input": text(5), "answers": [text(2)], "all_classes": words[:3]}
                for _ in range(2)]
        (data / f"{task}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


def test_full_preset_runs_on_a_local_model(local_model):
    parser = argparse.ArgumentParser()
    full.add_arguments(parser)
    args = parser.parse_args(["--model", str(local_model / "model"), "--tokenizer", str(local_model / "tokenizer"),
                              "--longbench", str(local_model / "longbench"),
                              "--tasks", "qasper", "trec", "--budgets", "8", "--n-fc", "4", "--cal-samples", "2",
                              "--cal-ks", "8", "16", "--dtype", "float32", "--no-progress"])
    result = full.run(args, local_model / "out")
    rows = result["rows"]
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in ("qasper", "trec") for m in full.METHODS}
    assert all(0 <= r["score"] <= 100 and r["samples"] == 2 for r in rows)
    assert (local_model / "out" / "calibration.json").exists() and (local_model / "out" / "longbench.md").exists()


def test_calibrate_command_keys_the_file_by_model(local_model, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text(" ".join(f"w{i % 90}" for i in range(200)))
    out = tmp_path / "cal.json"
    assert main(["calibrate", "fasa", "--model", str(local_model / "model"), "--tokenizer",
                 str(local_model / "tokenizer"), "--text", str(text), "--out", str(out),
                 "--windows", "2", "--ks", "8", "16", "--queries", "4"]) == 0
    data = json.loads(out.read_text())
    assert data["model"] == str(local_model / "model") and data["ks"] == [8, 16] and data["shape"][1:] == [3, 4, 8]
    assert data["fingerprint"]["model_type"] == "qwen2" and len(data["fingerprint"]["weights"]["k_proj"]) == 64
    # The full preset checks a given file against the loaded weights: same name and shapes, other weights fail.
    from transformers import AutoModelForCausalLM

    args = argparse.Namespace(calibration=str(out))
    same = AutoModelForCausalLM.from_pretrained(local_model / "model")
    assert full._calibration(args, same, None, tmp_path, False).ks == (8, 16)
    other = tiny_decoder("qwen2", seed=5)
    other.config.name_or_path = str(local_model / "model")  # the same name: only the weights differ
    with pytest.raises(ValueError, match=r"calibration: .*weights"):
        full._calibration(args, other, None, tmp_path, False)


def test_smollm2_keeps_dense_output_with_every_token():
    """Real weights: FASA with a budget above the length generates exactly the dense tokens."""
    pytest.importorskip("gguf")
    from prunelab.common.hf import model_source
    from prunelab.common.packaged import load_smollm2
    from prunelab.methods.fasa import FASA, Calibration
    from prunelab.methods.fasa.calibration import spec_fingerprint, weights_fingerprint

    try:
        model, tok = load_smollm2()
    except RuntimeError as err:  # the package is not installed
        pytest.skip(str(err))
    from prunelab.common.decoder import decoder_spec

    spec = decoder_spec(model)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (30, 9, 3, 64)
    fingerprint = {**spec_fingerprint(spec), "weights": weights_fingerprint(model)}
    cal = Calibration(*model_source(model), "rope_pairs", (64,), torch.rand(1, 30, 9, 32), {}, fingerprint)
    ids = tok(["def main():", "The pass key is"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        ref = model.generate(**ids, max_new_tokens=8, do_sample=False)
        with prunelab.apply(model, FASA(budget=10_000, calibration=cal)):
            out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)
