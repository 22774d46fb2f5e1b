"""Window-Diffusion's full preset and its lm-eval model ``prunelab_dlm``, offline: tiny LLaDA / Dream folders with a
character tokenizer, and a local lm-eval task over a JSON file the test writes."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from prunelab.reproductions.window_diffusion import full  # noqa: E402
from prunelab.reproductions.window_diffusion.full import load_model, load_tokenizer  # noqa: E402
from prunelab.reproductions.window_diffusion.lm_eval_model import DiffusionLMEval, apply_until  # noqa: E402

CHARS = list("0123456789+= abcdefghijklmnopqrstuvwxyz\n")
SPECIALS = ["<unk>", "<|bos|>", "<|eos|>", "<|mask|>"]
VOCAB = {t: i for i, t in enumerate(CHARS + SPECIALS)}
V = len(VOCAB)
TASK = "prunelab_tiny_sum"
DOCS = [{"question": "2+3", "answer": "5"}, {"question": "12+30", "answer": "42"},
        {"question": "7+1", "answer": "8"}, {"question": "100+11", "answer": "111"}]
WINDOW = ["--window-tokens", "8", "--active-tokens", "4", "--refresh-cycle", "6"]


def _save_tokenizer(folder):
    """A character-level fast tokenizer; like LLaDA's, its special tokens put BOS in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                       special_tokens=[("<|bos|>", VOCAB["<|bos|>"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|bos|>", eos_token="<|eos|>",
                            mask_token="<|mask|>").save_pretrained(folder)


def _llada_folder(folder):
    """A random LLaDA checkpoint under LLaDA's own parameter names, as ``load_llada`` reads the hub's; queries and keys
    scaled up so that attention is sharp and the answers depend on the prompt (at unit scale they collapse to one
    character)."""
    from safetensors.torch import save_file

    c, m, layers, heads, kv = 32, 48, 2, 4, 2
    g = torch.Generator().manual_seed(0)
    shapes = {"q_proj": (c, c), "k_proj": (c // heads * kv, c), "v_proj": (c // heads * kv, c), "attn_out": (c, c),
              "ff_proj": (m, c), "up_proj": (m, c), "ff_out": (c, m)}
    sd = {"model.transformer.wte.weight": torch.randn(V, c, generator=g),
          "model.transformer.ln_f.weight": torch.ones(c),
          "model.transformer.ff_out.weight": torch.randn(V, c, generator=g) / math.sqrt(c)}
    for i in range(layers):
        sd |= {f"model.transformer.blocks.{i}.{n}.weight": torch.randn(s, generator=g) / math.sqrt(s[1])
               * (3 if n in ("q_proj", "k_proj") else 1) for n, s in shapes.items()}
        sd |= {f"model.transformer.blocks.{i}.{n}.weight": torch.ones(c) for n in ("attn_norm", "ff_norm")}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": "llada", "d_model": c, "n_heads": heads, "n_kv_heads": kv, "n_layers": layers,
              "mlp_hidden_size": m, "vocab_size": V, "embedding_size": V, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-5, "max_sequence_length": 256, "weight_tying": False, "include_bias": False,
              "mask_token_id": VOCAB["<|mask|>"], "eos_token_id": VOCAB["<|eos|>"]}
    (folder / "config.json").write_text(json.dumps(config))
    _save_tokenizer(folder)
    return folder


def _dream_folder(folder):
    """A random Qwen2 model saved as Dream's folder (``model_type: Dream``, its mask and EOS ids)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    qwen.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=VOCAB["<|mask|>"],
                  eos_token_id=VOCAB["<|eos|>"])
    (folder / "config.json").write_text(json.dumps(config))
    _save_tokenizer(folder)
    return folder


def _task_folder(folder, cache):
    """A ``generate_until`` task over a local JSON file, scored by exact match."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.json").write_text(json.dumps(DOCS))
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'docs.json'}
  cache_dir: {cache}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}="
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("window_diffusion_full")
    return {"llada": _llada_folder(root / "llada"), "dream": _dream_folder(root / "dream"),
            "tasks": _task_folder(root / "tasks", root / "datasets_cache")}


def _args(argv):
    parser = argparse.ArgumentParser()
    full.add_arguments(parser)
    return parser.parse_args(argv)


def _argv(folders, family, *extra, gen=24):
    return ["--model-dir", str(folders[family]), "--tasks", f"{TASK}:0:{gen}", "--include-path", str(folders["tasks"]),
            "--no-builtin-tasks", "--limit", "2", "--dtype", "float32", "--device", "cpu", "--no-progress", *extra]


def _check_results(out, batch, gen=24):
    table = json.loads((out / "lm_eval.json").read_text())
    assert (out / "lm_eval.md").read_text().startswith("# Window-Diffusion, full preset")
    assert table["provenance"]["commit"] and table["provenance"]["lm_eval"]
    rows = {r["method"]: r for r in table["rows"]}
    assert set(rows) == {"vanilla", "window"}
    vanilla, window = rows["vanilla"], rows["window"]
    assert vanilla["n"] == window["n"] == 2 and vanilla["metric"] == "exact_match,none"
    assert 0 <= window["score"] <= 100 and 0 <= vanilla["score"] <= 100
    assert window["macs_per_sample"] < vanilla["macs_per_sample"]
    assert window["macs_ratio"] == pytest.approx(vanilla["macs_per_sample"] / window["macs_per_sample"])
    assert vanilla["speedup"] == 1.0 and window["speedup"] > 0
    assert window["forward_tokens"] < vanilla["forward_tokens"]
    assert window["paper"] == "n/a" and window["window"] == "8/4/6" and vanilla["window"] == "-"
    for method in ("vanilla", "window"):
        records = [json.loads(line) for line in (out / "samples" / f"{TASK}_{method}.jsonl").read_text().splitlines()]
        assert sorted(r["doc_id"] for r in records) == [0, 1] and all(r["task"] == TASK for r in records)
        assert all(r["seconds"] > 0 and r["gen_tokens"] == gen and r["batch"] == batch for r in records)
        assert all(0 <= r["answer_tokens"] <= gen and r["macs"] > 0 for r in records)
        assert rows[method]["s_per_sample"] == pytest.approx(sum(r["seconds"] for r in records) / 2)
        logged = (out / "samples" / f"{TASK}_{method}_lm_eval.jsonl").read_text().splitlines()
        assert len(logged) == 2 and "resps" in json.loads(logged[0])
    return rows


def test_llada_end_to_end_both_methods_batched(folders, tmp_path):
    out = tmp_path / "out"
    result = full.run(_args(_argv(folders, "llada", *WINDOW, "--batch-size", "2")), out)
    assert result["rows"] == json.loads((out / "lm_eval.json").read_text())["rows"]
    _check_results(out, batch=2)
    prompt_tokens = sorted(json.loads(line)["prompt_tokens"]
                           for line in (out / "samples" / f"{TASK}_window.jsonl").read_text().splitlines())
    assert prompt_tokens == [5, 7]  # BOS from the tokenizer's special tokens + "2+3=" / "12+30="


def test_dream_end_to_end_both_methods(folders, tmp_path):
    out = tmp_path / "out"
    full.run(_args(_argv(folders, "dream", *WINDOW, gen=16)), out)  # the family from config.json's "Dream"
    rows = _check_results(out, batch=1, gen=16)
    meta = json.loads((out / "lm_eval.json").read_text())["provenance"]
    assert meta["family"] == "dream" and meta["tasks"][TASK]["slide_window"] is True
    assert rows["window"]["check"] == "n/a"
    prompt_tokens = sorted(json.loads(line)["prompt_tokens"]
                           for line in (out / "samples" / f"{TASK}_window.jsonl").read_text().splitlines())
    assert prompt_tokens == [5, 7]  # Dream's BOS put in front once, the tokenizer's special tokens not added


def _requests(contexts, until=("\n",)):
    return [Instance("generate_until", {}, (c, {"until": list(until)}), i, (TASK, i, 1))
            for i, c in enumerate(contexts)]


@pytest.mark.parametrize("method", ["vanilla", "window"])
def test_adapter_batch_answers_like_single_requests(folders, method):
    model, tok = load_model(folders["llada"], "llada", "float32"), load_tokenizer(folders["llada"])
    contexts = ["2+3=", "100+11=", "12+30=", "7+1="]
    settings = {"window_tokens": 8, "active_tokens": 4, "refresh_cycle": 6}

    def answers(batch):
        lm = DiffusionLMEval(model=model, tokenizer=tok, method=method, gen_length=12, batch_size=batch,
                             progress=False, **settings)
        return lm.generate_until(_requests(contexts, until=())), lm.records

    single, _ = answers(1)
    batched, records = answers(3)
    assert batched == single and len(set(single)) > 1
    assert sorted(r.batch for r in records) == [1, 3, 3, 3]  # longest prompts first, 3 then 1
    assert {r.doc_id: r.response for r in records} == dict(enumerate(single))


def test_adapter_cuts_at_eos_then_until(folders):
    model, tok = load_model(folders["llada"], "llada", "float32"), load_tokenizer(folders["llada"])
    lm = DiffusionLMEval(model=model, tokenizer=tok, method="vanilla", gen_length=8, progress=False)
    answer = [VOCAB[c] for c in "12a3"] + [VOCAB["<|eos|>"]] + [VOCAB[c] for c in "999"]
    gen = type("G", (), {"answer": torch.tensor([answer]), "log": [("full", 10, 10.0)], "forward_tokens": 10})()
    lm.sample = lambda prompts: gen
    assert lm.generate_until(_requests(["1+1="], until=["a"])) == ["12"]
    assert lm.records[0].answer_tokens == 4
    assert apply_until("x\ny#z", ["#", "\n"]) == "x" and apply_until("abc", "") == "abc"


def test_adapter_refuses_loglikelihood_and_bad_settings(folders):
    model, tok = load_model(folders["llada"], "llada", "float32"), load_tokenizer(folders["llada"])
    lm = DiffusionLMEval(model=model, tokenizer=tok, progress=False)
    request = Instance("loglikelihood", {}, ("1+1=", "2"), 0, ("arc_easy", 0, 1))
    with pytest.raises(NotImplementedError, match="loglikelihood requests .*arc_easy.* generatively"):
        lm.loglikelihood([request])
    with pytest.raises(ValueError, match="^method:"):
        DiffusionLMEval(model=model, tokenizer=tok, method="fast")
    with pytest.raises(ValueError, match="^active_tokens:"):
        DiffusionLMEval(model=model, tokenizer=tok, window_tokens=4, active_tokens=8)
    with pytest.raises(ValueError, match="^family:"):
        DiffusionLMEval(model=model, tokenizer=tok, family="dream")


def test_bad_arguments_name_the_parameter(folders, tmp_path, capsys, monkeypatch):
    base = ["--model-dir", str(folders["llada"]), "--include-path", str(folders["tasks"]), "--no-builtin-tasks"]
    with pytest.raises(SystemExit, match="^--active-tokens: 9 exceeds window_tokens 8"):
        full.run(_args([*base, "--tasks", f"{TASK}:0:24", "--window-tokens", "8", "--active-tokens", "9"]), tmp_path)
    with pytest.raises(SystemExit, match="^--max-length: 24 leaves no room"):
        full.run(_args([*base, "--tasks", f"{TASK}:0:24", "--max-length", "24"]), tmp_path)
    with pytest.raises(SystemExit, match="^--tasks: lm-eval knows no task 'no_such_task'"):
        full.run(_args([*base, "--tasks", "no_such_task:0:8"]), tmp_path)
    with pytest.raises(SystemExit, match="^--tasks: 'no_such_task' has no answer length"):
        full.run(_args([*base, "--tasks", "no_such_task"]), tmp_path)
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    with pytest.raises(SystemExit, match="^--tasks: .*humaneval.*HF_ALLOW_CODE_EVAL=1"):
        full.run(_args([*base, "--tasks", "humaneval"]), tmp_path)
    if not full._math_extra():
        with pytest.raises(SystemExit, match="^--tasks: minerva_math needs lm-eval's math extra"):
            full.run(_args([*base, "--tasks", "minerva_math"]), tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SystemExit, match="^--family: config.json's model_type 'gpt2'"):
        full.run(_args(["--model-dir", str(bare)]), tmp_path)
    for argv, option in ((["--limit", "0"], "--limit"), (["--tasks", "gsm8k:x"], "--tasks"),
                         (["--tasks", "gsm8k:4:0"], "--tasks"), (["--dtype", "int8"], "--dtype")):
        with pytest.raises(SystemExit):
            _args(["--model-dir", str(folders["llada"]), *argv])
        assert option in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))  # nothing ran


def test_paper_tasks_settings_and_reference():
    exp = full.expected()["llada_8b_base"]
    assert {k: v["score"] for k, v in exp["tasks"].items()} == {"gsm8k": 68.46, "minerva_math": 26.16,
                                                                "humaneval": 28.05, "mbpp": 38.20}
    assert "d8bb349" in exp["source"] and exp["settings"]["window_tokens"] == 64
    args = _args(["--model-dir", "."])
    tasks = full.resolve_tasks(None, "llada")
    assert [(t.name, t.num_fewshot, t.gen_length) for t in tasks] == [
        ("gsm8k", 4, 256), ("minerva_math", 4, 256), ("humaneval", 0, 512), ("mbpp", 3, 512)]
    for t in tasks:
        settings = full.sampler_settings("llada", t, args)
        assert full._paper("llada", t, settings, full.expected())["metric"] == t.metric
    off = full.sampler_settings("llada", tasks[0], _args(["--model-dir", ".", "--refresh-cycle", "16"]))
    assert full._paper("llada", tasks[0], off, full.expected()) is None
    assert full._paper("llada", full.resolve_tasks([full.task_spec("gsm8k:8")], "llada")[0],
                       full.sampler_settings("llada", tasks[0], args), full.expected()) is None
    dream = {t.name: t for t in full.resolve_tasks(None, "dream")}
    assert (dream["gsm8k_cot"].num_fewshot, dream["minerva_math"].gen_length) == (8, 512)
    humaneval = full.sampler_settings("dream", dream["humaneval"], args)
    assert (humaneval["refresh_cycle"], humaneval["top_p"], humaneval["window_tokens"]) == (40, 0.95, 128)


def test_tokenizer_mapped_to_remote_code_loads_without_it(folders, tmp_path):
    folder = tmp_path / "remote"
    _save_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="DreamTokenizer", auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer",
                                                                                None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok("12", add_special_tokens=False)["input_ids"] == [VOCAB["1"], VOCAB["2"]]
    assert tok.mask_token_id == VOCAB["<|mask|>"]


def test_dream_style_bpe_tokenizer_loads_without_its_code(tmp_path):
    """Dream's folder: vocab.json + merges.txt and a config mapping to its own class; Qwen2's BPE reads them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]  # GPT-2's byte alphabet
    vocab = {s: i for i, s in enumerate(symbols)} | {"ab": len(symbols)}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    special = {"special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    names = ["<|endoftext|>", "<|beginoftext|>", "<|mask|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DreamTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "bos_token": names[1], "eos_token": names[0], "mask_token": names[2],
        "added_tokens_decoder": {str(len(vocab) + i): {"content": n, **special} for i, n in enumerate(names)}}))
    tok = load_tokenizer(tmp_path)
    assert (tok.eos_token_id, tok.bos_token_id, tok.mask_token_id) == (len(vocab), len(vocab) + 1, len(vocab) + 2)
    ids = tok("ab a<|mask|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == vocab["ab"] and ids[-1] == tok.mask_token_id and tok.decode(ids) == "ab a<|mask|>"


def test_registered_model_runs_from_an_argument_string(folders):
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = f"model_dir={folders['llada']},method=window,gen_length=12,window_tokens=8,active_tokens=4,dtype=float32"
    result = lm_eval.simple_evaluate(model="prunelab_dlm", model_args=args, tasks=[TASK], limit=2, batch_size=2,
                                     device="cpu", task_manager=TaskManager(include_path=str(folders["tasks"]),
                                                                            include_defaults=False))
    assert result["results"][TASK]["sample_len"] == 2
    assert result["config"]["method"] == "window" and result["config"]["window"]["window_tokens"] == 8
    assert result["config"]["batch_size"] == 2 and result["config"]["family"] == "llada"
