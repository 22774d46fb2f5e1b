"""The tiny VLM test-bed: a real ``LlavaForConditionalGeneration`` answering questions about Fashion-MNIST composites.

Architecture (LLaVA-1.5's, at a small scale), every part trained here (``train_vlm.py``):

- a CLIP vision tower (84 px composites, 7 px patches: a 12 x 12 grid of 144 patch tokens plus CLS, width 192,
  3 heads, 5 layers) read at LLaVA's feature layer -2 with ``"default"`` selection (the CLS is dropped);
- LLaVA's two-layer GELU projector;
- a small Llama (4 layers, width 256, 4 heads, RoPE) over a word-level vocabulary of the questions' words.

Why not SmolLM2-135M: aligned to this tower on 2 CPU cores it stayed at chance. Its packaged weights process
about 2 prompts a second with gradients through them; a projector alone, the projector with rank-8 adapters on
the attention maps (32 minutes, 4.8k questions), and a caption-like warm-up (the nine cell names as the target)
all stayed at or near chance on held-out questions. A Llama this size trained from scratch on the templated
language sees ten times more questions in the same time, and it is the same model class LLaVA-1.5 runs
(``LlamaForCausalLM`` behind the same seam), so every VLM method runs on it unchanged.

Prompt: 144 ``<image>`` placeholders, then ``"Question: {question} Answer:"``; the answer is one word, so a question
is answered by the argmax of the next-token logits over its kind's choices (:func:`choice_logits`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import shipped
from prunelab.reproductions.testbeds.shipped import sha256

PATCH = 7
TOKENS = (C.SIZE // PATCH) ** 2  # 144 image tokens per composite
TOWER = dict(model_type="clip_vision_model", hidden_size=192, intermediate_size=768, num_hidden_layers=5,
             num_attention_heads=3, image_size=C.SIZE, patch_size=PATCH, projection_dim=192)
SPECIAL = ("<pad>", "<unk>", "<image>")
PAD, UNK, IMAGE_TOKEN = 0, 1, 2
PROMPT = "Question: {question} Answer:"
WEIGHTS = Path(__file__).with_name("weights") / "vlm.safetensors"
SHA256 = "b8938a31559fd5c18af2125d204e43a48d73220cf849592b9ddf0cfc75f4bcc8"  # of WEIGHTS (stages A-C)
BASE_WEIGHTS = WEIGHTS.with_name("vlm_base.safetensors")
BASE_SHA256 = "578fb8a91089fd2031828b00e88e632e66f7f90021655b9f3985575b8cd2a752"  # of BASE_WEIGHTS (stages A-B)
COMMAND = "python -m prunelab.reproductions.testbeds.train_vlm"
FAMILY, ARCHITECTURE = "llava", "LLaVA"

__all__ = ["ARCHITECTURE", "BASE_SHA256", "BASE_WEIGHTS", "FAMILY", "IMAGE_TOKEN", "PAD", "PROMPT", "SHA256", "TOKENS",
           "TOWER", "UNK", "WEIGHTS", "answer_ids", "batch", "build", "cached_forward", "choice_logits", "extend_from",
           "left_pad", "llava_config", "load", "model_inputs", "patch_cells", "sha256", "text_config", "tokenizer",
           "tower_features", "tower_macs", "vocabulary", "word_tokenizer"]

_WORD = re.compile(r"\w+|[^\w\s]")


def vocabulary() -> tuple[str, ...]:
    """The special tokens, then every lower-cased word and mark of the prompts, questions (both template sets,
    every field value) and answers, sorted: derived from ``composites``, so a changed template changes it (the
    trained weights record the vocabulary they were trained with, and :func:`load` checks it)."""
    text = [PROMPT, *C.NAMES, *C.PLURALS, *C.POSITIONS, *C.RELATIONS, *(w for c in C.CHOICES.values() for w in c)]
    text += [t for kinds in C.TEMPLATES.values() for ts in kinds.values() for t in ts]
    words = {w.lower() for t in text for w in _WORD.findall(re.sub(r"\{\w+\}", " ", t))}
    return SPECIAL + tuple(sorted(words))


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary` (lower-cases, splits words and marks)."""
    return word_tokenizer(vocabulary())


@lru_cache(maxsize=4)
def word_tokenizer(words: tuple[str, ...]):
    """A word-level ``PreTrainedTokenizerFast`` whose ids are the positions in ``words`` (which start with the
    special tokens ``<pad>``, ``<unk>``, ``<image>``); shared with test-beds that extend :func:`vocabulary`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if words[:len(SPECIAL)] != SPECIAL:
        raise ValueError(f"words must start with {SPECIAL}, got {words[:len(SPECIAL)]}")
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+, as _WORD (the texts have single marks)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<image>"])


def text_config() -> dict:
    """The language model's ``LlamaConfig`` fields."""
    return dict(model_type="llama", vocab_size=len(vocabulary()), hidden_size=256, intermediate_size=768,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                pad_token_id=PAD, tie_word_embeddings=False)


def llava_config(**text):
    """The test-bed's ``LlavaConfig``; ``text`` overrides fields of :func:`text_config` (a test-bed that extends the
    vocabulary or the positions builds the same architecture with them)."""
    import transformers as tf

    return tf.LlavaConfig(vision_config=dict(TOWER), text_config={**text_config(), **text}, image_token_id=IMAGE_TOKEN,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", pad_token_id=PAD)


def build(seed: int = 0):
    """The untrained test-bed, fp32, eval mode, SDPA; and its tokenizer."""
    import transformers as tf

    config = llava_config()
    torch.manual_seed(seed)
    return tf.LlavaForConditionalGeneration(config).eval(), tokenizer()


def extend_from(model, source) -> None:
    """Copy ``source``'s weights (a test-bed model of this architecture) into ``model``, which may have a longer
    vocabulary: whole tensors where the shapes agree, the first rows of the embedding and the head otherwise (the
    extended vocabularies keep the old ids' words)."""
    state = model.state_dict()
    for name, value in source.state_dict().items():
        if state[name].shape == value.shape:
            state[name] = value
        else:
            state[name][:value.shape[0]] = value
    model.load_state_dict(state)


def load(path: str | Path | None = None, *, base: bool = False, check: bool = True):
    """The trained test-bed (fp32, eval) from ``path`` (default: the shipped :data:`WEIGHTS`; with ``base``, the
    shipped :data:`BASE_WEIGHTS` of stages A-B, where stage C and the ICL and LISA test-beds start), and its
    tokenizer.

    A shipped file is checked against its SHA-256, and any file's recorded vocabulary against :func:`vocabulary`; a
    mismatch raises instead of answering with the wrong weights or words."""
    from safetensors.torch import load_file

    shipped_path, digest = (BASE_WEIGHTS, BASE_SHA256) if base else (WEIGHTS, SHA256)
    path, meta = shipped.metadata(path, shipped_path, digest, COMMAND + (" --stage ab" if base else ""), check=check)
    if meta.get("vocabulary") != "\n".join(vocabulary()):
        raise ValueError(f"path: {path} was trained with another vocabulary than vocabulary() gives now "
                         "(were the templates changed?); retrain the test-bed")
    model, tok = build()
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval(), tok


def answer_ids(tok=None) -> dict[str, int]:
    """The token id of every answer word."""
    tok = tok or tokenizer()
    out = {}
    for word in sorted({w for choices in C.CHOICES.values() for w in choices}):
        ids = tok(word).input_ids
        if len(ids) != 1 or ids[0] == UNK:
            raise ValueError(f"answer {word!r} is not one known token of this tokenizer")
        out[word] = ids[0]
    return out


def left_pad(rows: Sequence[Sequence[int]]) -> dict:
    """``input_ids`` and ``attention_mask`` of the token id lists ``rows``, left-padded with :data:`PAD` to the
    longest (every prompt of the test-beds ends where the next token is read)."""
    width = max(len(r) for r in rows)
    return dict(input_ids=torch.tensor([[PAD] * (width - len(r)) + list(r) for r in rows]),
                attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]))


def batch(samples: Sequence[C.Sample], scenes: C.Scenes, tok=None, *, pixels: torch.Tensor | None = None) -> dict:
    """Model inputs for ``samples`` (left padding), with ``answer`` [B] (the answer token ids) and ``kind`` (list)."""
    tok = tok or tokenizer()
    ids = [[IMAGE_TOKEN] * TOKENS + tok(PROMPT.format(question=s.question)).input_ids for s in samples]
    if pixels is None:
        pixels = C.to_pixels(scenes.images([s.scene_index for s in samples]))
    words = answer_ids(tok)
    return dict(left_pad(ids), pixel_values=pixels, answer=torch.tensor([words[s.answer] for s in samples]),
                kind=[s.kind for s in samples])


def model_inputs(x: dict) -> dict:
    """The model's arguments from a :func:`batch` (which also carries ``answer`` and ``kind``)."""
    return {k: x[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def choice_logits(logits: torch.Tensor, kinds: Sequence[str], tok=None) -> list[torch.Tensor]:
    """Per sample, the last position's logits over its kind's choices (``C.CHOICES[kind]`` order)."""
    words = answer_ids(tok)
    return [logits[b, -1, [words[w] for w in C.CHOICES[k]]] for b, k in enumerate(kinds)]


def patch_cells() -> torch.Tensor:
    """[144] the grid cell (0..8, row-major) of each image token (raster order of the 12 x 12 patches)."""
    side, per = C.SIZE // PATCH, C.CELL // PATCH
    rows = torch.arange(side)[:, None].expand(side, side) // per
    cols = torch.arange(side)[None, :].expand(side, side) // per
    return (rows * C.GRID + cols).flatten()


def tower_macs(model) -> int:
    """MACs of one image through the CLIP tower (every layer, as the model runs it) and the projector."""
    from prunelab.common.flops import ViTDims, vit_macs

    cfg = model.config.vision_config
    side = cfg.image_size // cfg.patch_size
    dims = ViTDims(depth=cfg.num_hidden_layers, embed_dim=cfg.hidden_size, attn_dim=cfg.hidden_size,
                   mlp_hidden=cfg.intermediate_size, num_patches=side * side, num_prefix=1,
                   patch_in=3 * cfg.patch_size ** 2, head_in=0, num_outputs=0)
    text = model.config.get_text_config().hidden_size
    return vit_macs(dims) + TOKENS * (cfg.hidden_size + text) * text


def tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """[N, 144, 192] what the projector reads: the CLIP tower's layer -2 without the CLS (as LLaVA selects it)."""
    h = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
    return h[:, 1:]


def cached_forward(model, input_ids: torch.Tensor, features: torch.Tensor, *,
                   attention_mask: torch.Tensor | None = None, hidden: bool = False):
    """The language model's output for prompts ``input_ids`` (with ``attention_mask`` when they are padded) whose
    images have the tower features ``features`` (one row per image in prompt order), as the full model computes it
    from pixels (``hidden``: with every layer's hidden states). This is the training path of a frozen tower: it runs
    once per image of a pool, not once per prompt."""
    embeds = model.get_input_embeddings()(input_ids)
    if len(features):
        projected = model.model.multi_modal_projector(features)
        embeds = embeds.masked_scatter((input_ids == IMAGE_TOKEN)[..., None], projected.to(embeds.dtype))
    return model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=hidden)
