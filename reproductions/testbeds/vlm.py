"""The tiny VLM test-bed: a real ``LlavaForConditionalGeneration`` answering questions about Fashion-MNIST composites.

Architecture (LLaVA-1.5's, at a small scale): a CLIP vision tower trained here (84 px composites, 7 px patches: a
12 x 12 grid of 144 patch tokens plus CLS, width 192, 3 heads, 5 layers), LLaVA's feature layer -2 and ``"default"``
feature selection (the CLS is dropped), LLaVA's two-layer GELU projector, and SmolLM2-135M-Instruct with its
packaged weights as the language model, adapted by low-rank deltas (LoRA) on its linear maps. Every VLM method runs
on it through the real seam, unchanged.

Prompt: 144 image placeholders, then ``"\\nQuestion: {question}\\nAnswer:"``; the answer is one token (`` yes``,
`` bag``, `` three``, ...: ``composites.NAMES`` and ``COUNTS`` are one token each after a space), so a question is
answered by the argmax of the next-token logits over its kind's choices (:func:`choice_logits`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from prunelab.reproductions.testbeds import composites as C

IMAGE_TOKEN = 49151  # the last id of SmolLM2's vocabulary, never produced by its tokenizer for text
PATCH = 7
TOKENS = (C.SIZE // PATCH) ** 2  # 144 image tokens per composite
TOWER = dict(model_type="clip_vision_model", hidden_size=192, intermediate_size=768, num_hidden_layers=5,
             num_attention_heads=3, image_size=C.SIZE, patch_size=PATCH, projection_dim=192)
PROMPT = "\nQuestion: {question}\nAnswer:"

__all__ = ["IMAGE_TOKEN", "PROMPT", "TOKENS", "TOWER", "answer_ids", "batch", "build", "choice_logits", "patch_cells"]


def build(seed: int = 0):
    """The untrained test-bed: a random tower and projector, SmolLM2-135M's packaged weights; and the tokenizer."""
    import transformers as tf

    from prunelab.common.packaged import load_smollm2

    smol, tokenizer = load_smollm2()
    config = tf.LlavaConfig(vision_config=TOWER, text_config=smol.config.to_dict(), image_token_id=IMAGE_TOKEN,
                            vision_feature_layer=-2, vision_feature_select_strategy="default",
                            projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(smol.model.state_dict())
    model.lm_head.load_state_dict(smol.lm_head.state_dict())
    return model.eval(), tokenizer


def answer_ids(tokenizer) -> dict[str, int]:
    """The token id of every answer word after a space; an error if one is not a single token."""
    out = {}
    for word in sorted({w for choices in C.CHOICES.values() for w in choices}):
        ids = tokenizer(" " + word).input_ids
        if len(ids) != 1:
            raise ValueError(f"answer {word!r} is {len(ids)} tokens for this tokenizer; answers must be one token")
        out[word] = ids[0]
    return out


def batch(samples: Sequence[C.Sample], scenes: C.Scenes, tokenizer, *, pixels: torch.Tensor | None = None) -> dict:
    """Model inputs for ``samples`` (left padding), with ``answer`` [B] (the answer token ids) and ``kind`` (list)."""
    ids = [[IMAGE_TOKEN] * TOKENS + tokenizer(PROMPT.format(question=s.question)).input_ids for s in samples]
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    if pixels is None:
        pixels = C.to_pixels(scenes.images([s.scene_index for s in samples]))
    words = answer_ids(tokenizer)
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixels,
                answer=torch.tensor([words[s.answer] for s in samples]), kind=[s.kind for s in samples])


def choice_logits(logits: torch.Tensor, kinds: Sequence[str], tokenizer) -> list[torch.Tensor]:
    """Per sample, the last position's logits over its kind's choices (``C.CHOICES[kind]`` order)."""
    words = answer_ids(tokenizer)
    return [logits[b, -1, [words[w] for w in C.CHOICES[k]]] for b, k in enumerate(kinds)]


def patch_cells() -> torch.Tensor:
    """[144] the grid cell (0..8, row-major) of each image token (raster order of the 12 x 12 patches)."""
    side, per = C.SIZE // PATCH, C.CELL // PATCH
    rows = torch.arange(side)[:, None].expand(side, side) // per
    cols = torch.arange(side)[None, :].expand(side, side) // per
    return (rows * C.GRID + cols).flatten()
