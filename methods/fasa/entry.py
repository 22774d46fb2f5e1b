"""FASA's registry entry (``prunelab.registry``)."""

from prunelab.methods.fasa.method import FASA
from prunelab.registry import MethodEntry


def tiny_calibration(model) -> dict:
    """A calibration of ``model`` on random token windows: enough for the invariants, meaningless for quality."""
    import torch

    from prunelab.methods.fasa.calibration import calibrate

    vocab = model.config.get_text_config().vocab_size
    windows = torch.randint(1, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    return {"calibration": calibrate(model, windows, ks=(4, 8, 16), n_queries=8, progress=False), "n_fc": 4}


ENTRIES = (
    MethodEntry(
        name="fasa", cls=FASA, family="LLM KV cache", seams=("decoder",),
        paper="FASA: Frequency-aware Sparse Attention (ICLR 2026)",
        backbones=("transformers Llama", "Qwen2", "Qwen3", "Mistral"),
        baselines=("oracle_topk", "sink_recent", "dense_decode"), reproduction="fasa", tiny=tiny_calibration,
        keep_all={"budget": 10**6}, prune={"budget": 6},
        bad=(({"budget": 0}, "budget"), ({"budget": -3}, "budget"), ({"budget": 1.5}, "budget"),
             ({"budget": True}, "budget"), ({"budget": float("nan")}, "budget"), ({"budget": "8"}, "budget"),
             ({"budget": "0.5"}, "budget"), ({"n_fc": 0}, "n_fc"), ({"n_fc": 2.0}, "n_fc"),
             ({"n_fc": 9}, "n_fc"),  # above d/2 = 8 of the tiny models: refused at install
             ({"fc_layout": "blocks"}, "fc_layout"), ({"gqa_mode": "mean"}, "gqa_mode"),
             ({"dense_layers": (0.5,)}, "dense_layers"), ({"dense_layers": 1}, "dense_layers"),
             ({"tau": 2.0}, "tau"), ({"tau": "0.8"}, "tau"), ({"fallback_k": 0}, "fallback_k"),
             ({"fallback_k": 512.0}, "fallback_k"), ({"calibration": 3}, "calibration")),
        status="tiny on SmolLM2-135M (real weights); full preset needs the paper's models + LongBench-V1",
    ),
)
