"""The Qwen2.5-VL variant of the VLM test-bed: a real ``Qwen2_5_VLForConditionalGeneration`` on the same composites.

Where the papers' Qwen paths differ from LLaVA's is the vision side and the positions, so those are Qwen2.5-VL's own,
at a small scale (every part trained here, ``train_vlm_qwen.py``):

- the Qwen2.5-VL vision tower (84 px composites, 7 px patches: a 12 x 12 grid of 144 patches, no CLS; width 192,
  3 heads, 4 blocks, window attention in windows of 4 x 4 merge units (56 px) except full attention at blocks 1 and 3,
  2-D rotary embeddings), the images given as the processor gives them (:func:`patchify`: each patch repeated over
  ``temporal_patch_size`` 2, patches grouped by 2 x 2 merge unit);
- the ``PatchMerger``: each 2 x 2 unit of patches becomes one language-model token, so an image is 6 x 6 = 36 tokens
  and a cell of the 3 x 3 grid is 2 x 2 = 4 of them (LLaVA's test-bed: 144 tokens, 16 a cell);
- a Qwen2.5-VL text model (4 layers, width 256, 4 heads over 2 key-value heads, 3-D M-RoPE with sections 8/12/12 of
  the 32 rotary frequencies: an image token's height and width positions are its row and column in the merged grid)
  over the LLaVA test-bed's word-level vocabulary plus Qwen's vision start and end markers.

Prompt: ``<|vision_start|>``, 36 image placeholders, ``<|vision_end|>``, then ``"Question: {question} Answer:"``;
the answer is the argmax of the next-token logits over the question kind's choices, as in :mod:`.vlm`. The model
inputs are what ``Qwen2_5_VLProcessor`` produces: ``input_ids``, ``attention_mask``, ``pixel_values`` [B * 144,
294], ``image_grid_thw`` and ``mm_token_type_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import shipped, vlm

PATCH, MERGE, TEMPORAL = 7, 2, 2
SIDE = C.SIZE // PATCH  # 12 patches a side
GRID_THW = (1, SIDE, SIDE)
TOKENS = (SIDE // MERGE) ** 2  # 36 language-model tokens per composite
VISION = dict(depth=4, hidden_size=192, intermediate_size=768, num_heads=3, in_channels=3, patch_size=PATCH,
              temporal_patch_size=TEMPORAL, spatial_merge_size=MERGE, window_size=56, out_hidden_size=256,
              fullatt_block_indexes=[1, 3])
MARKERS = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
IMAGE_TOKEN, PAD = vlm.IMAGE_TOKEN, vlm.PAD
WEIGHTS = Path(__file__).with_name("weights") / "vlm_qwen.safetensors"
SHA256 = "ee52d87ee301ea3bc22f75dc9b8740ef17d443ea17e4d02f72fb9240107d4e64"  # of WEIGHTS
COMMAND = "python -m prunelab.reproductions.testbeds.train_vlm_qwen"
FAMILY, ARCHITECTURE = "qwen2_5_vl", "Qwen2.5-VL"

__all__ = ["ARCHITECTURE", "COMMAND", "FAMILY", "GRID_THW", "IMAGE_TOKEN", "SHA256", "TOKENS", "VISION", "WEIGHTS",
           "batch", "build", "cached_forward", "choice_logits", "load", "merged_units", "model_inputs", "patch_cells",
           "patchify", "tokenizer", "tower_macs", "tower_states", "vision_ids", "vocabulary"]


def vocabulary() -> tuple[str, ...]:
    """The LLaVA test-bed's vocabulary (same ids), then Qwen's vision start and end markers and its video token."""
    return vlm.vocabulary() + MARKERS


def vision_ids() -> tuple[int, int, int]:
    """Token ids of ``<|vision_start|>``, ``<|vision_end|>`` and ``<|video_pad|>``."""
    n = len(vlm.vocabulary())
    return n, n + 1, n + 2


def tokenizer():
    """A word-level tokenizer over :func:`vocabulary` (the markers are inserted by id, never typed)."""
    return vlm.word_tokenizer(vocabulary())


def config():
    """The test-bed's ``Qwen2_5_VLConfig``."""
    import transformers as tf

    start, end, video = vision_ids()
    text = dict(vocab_size=len(vocabulary()), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD,
                bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]})
    return tf.Qwen2_5_VLConfig(vision_config=dict(VISION), text_config=text, image_token_id=IMAGE_TOKEN,
                               video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
                               pad_token_id=PAD, tie_word_embeddings=False)


def build(seed: int = 0):
    """The untrained test-bed, fp32, eval mode, SDPA; and its tokenizer."""
    import transformers as tf

    torch.manual_seed(seed)
    return tf.Qwen2_5_VLForConditionalGeneration(config()).eval(), tokenizer()


def load(path: str | Path | None = None, *, check: bool = True):
    """The trained test-bed (fp32, eval) from ``path`` (default: the shipped :data:`WEIGHTS`, checked against
    :data:`SHA256`) and its tokenizer; a file trained with another vocabulary is refused."""
    return shipped.load_with_vocabulary(build, path, WEIGHTS, SHA256, COMMAND, vocabulary(), check=check)


def patchify(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, 84, 84] -> ``pixel_values`` [B * 144, 3 * 2 * 7 * 7] in ``Qwen2VLImageProcessor``'s layout: the image
    repeated over the temporal patch, patches in raster order of the 2 x 2 merge units and raster order within each,
    every patch flattened as (channel, time, row, column)."""
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, C.SIZE, C.SIZE):
        raise ValueError(f"pixels: expected [B, 3, {C.SIZE}, {C.SIZE}], got {tuple(pixels.shape)}")
    B, m, g = pixels.shape[0], MERGE, SIDE // MERGE
    x = pixels[:, None].expand(B, TEMPORAL, 3, C.SIZE, C.SIZE)
    x = x.reshape(B, TEMPORAL, 3, g, m, PATCH, g, m, PATCH).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(B * SIDE * SIDE, 3 * TEMPORAL * PATCH * PATCH)


def patch_cells() -> torch.Tensor:
    """[36] the grid cell (0..8, row-major) of each image token (raster order of the 6 x 6 merged grid)."""
    side, per = SIDE // MERGE, C.CELL // (PATCH * MERGE)
    rows = torch.arange(side)[:, None].expand(side, side) // per
    cols = torch.arange(side)[None, :].expand(side, side) // per
    return (rows * C.GRID + cols).flatten()


def prompt_ids(question: str, tok=None) -> list[int]:
    """The token ids of one evaluation prompt: the image's span, then the question."""
    tok = tok or tokenizer()
    start, end, _ = vision_ids()
    return [start, *[IMAGE_TOKEN] * TOKENS, end, *tok(vlm.PROMPT.format(question=question)).input_ids]


def batch(samples: Sequence[C.Sample], scenes: C.Scenes, tok=None, *, pixels: torch.Tensor | None = None) -> dict:
    """Model inputs for ``samples`` (left padding, one image each), with ``answer`` [B] (the answer token ids) and
    ``kind`` (list)."""
    tok = tok or tokenizer()
    out = vlm.left_pad([prompt_ids(s.question, tok) for s in samples])
    out["mm_token_type_ids"] = (out["input_ids"] == IMAGE_TOKEN).long()
    if pixels is None:
        pixels = C.to_pixels(scenes.images([s.scene_index for s in samples]))
    words = vlm.answer_ids(tok)
    return dict(out, pixel_values=patchify(pixels), image_grid_thw=torch.tensor([GRID_THW] * len(samples)),
                answer=torch.tensor([words[s.answer] for s in samples]), kind=[s.kind for s in samples])


def model_inputs(x: dict) -> dict:
    """The model's arguments from a :func:`batch` (which also carries ``answer`` and ``kind``)."""
    return {k: x[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")}


def choice_logits(logits: torch.Tensor, kinds: Sequence[str], tok=None) -> list[torch.Tensor]:
    """Per sample, the last position's logits over its kind's choices (the answer words keep the LLaVA test-bed's
    ids)."""
    return vlm.choice_logits(logits, kinds, tok or tokenizer())


def tower_macs(model) -> int:
    """MACs of one image through the vision tower and the merger as the model runs them: the patch embedding, per
    block the fused QKV, the output projection, the gated MLP and the attention products within each segment (the
    attention windows, or the whole image at the full-attention blocks), then the merger's two layers."""
    from prunelab.common.hf import vision_windows

    v = model.config.vision_config
    d, n = v.hidden_size, SIDE * SIDE
    _, bounds = vision_windows(torch.tensor([GRID_THW]), v.spatial_merge_size, v.window_size, v.patch_size)
    windows = torch.as_tensor(bounds).diff().tolist()
    macs = n * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * d
    for block in range(v.depth):
        segments = [n] if block in v.fullatt_block_indexes else windows
        macs += n * d * 3 * d + n * d * d + 3 * n * d * v.intermediate_size + 2 * d * sum(s * s for s in segments)
    unit = d * v.spatial_merge_size ** 2
    return macs + TOKENS * (unit * unit + unit * v.out_hidden_size)


def merged_units(states: torch.Tensor, n_images: int) -> torch.Tensor:
    """The tower's last hidden states (window order, as ``visual(...).last_hidden_state``) of ``n_images`` images
    of :data:`GRID_THW` -> [n_images, 36, 4, 192]: each image's merge units in raster order, the merger's input."""
    from prunelab.common.hf import vision_windows

    grid = torch.tensor([GRID_THW] * n_images)
    window_index, _ = vision_windows(grid, MERGE, VISION["window_size"], PATCH)
    units = states.view(-1, MERGE * MERGE, states.shape[-1])[torch.argsort(window_index)]
    return units.view(n_images, TOKENS, MERGE * MERGE, states.shape[-1])


def tower_states(model, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 36, 4, 192] what the merger reads for each image of ``pixels`` [N, 3, 84, 84] (:func:`merged_units`)."""
    grid = torch.tensor([GRID_THW] * len(pixels))
    states = model.model.visual(patchify(pixels), grid_thw=grid).last_hidden_state
    return merged_units(states, len(pixels))


def cached_forward(model, x: dict, states: torch.Tensor, *, hidden: bool = False):
    """The language model's output for prompts ``x`` (``input_ids``, ``attention_mask``, ``mm_token_type_ids``; one
    image each) whose images have the merger inputs ``states`` [B, 36, 4, 192] (:func:`tower_states`), as the full
    model computes it from pixels (the merger runs here, so it trains; the M-RoPE positions are the model's own);
    ``hidden``: with every layer's hidden states. The training path of a frozen tower."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    merged = model.model.visual.merger(states.flatten(0, 1))  # [B * 36, text width], raster order per image
    encoded = BaseModelOutputWithPooling(pooler_output=merged.split(TOKENS))
    grid = torch.tensor([GRID_THW] * len(states))
    return model.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], image_grid_thw=grid,
                       mm_token_type_ids=x["mm_token_type_ids"], mm_encoder_outputs={"image": encoded},
                       output_hidden_states=hidden)
