"""Offline stand-ins for the VLM full presets: tiny model folders with processors, and a synthetic lmms-eval task.

The full presets load a checkpoint folder (``AutoConfig`` / ``AutoProcessor`` / the family's model class) and
score lmms-eval tasks. Without hub access the same code path runs on:

- :func:`save_tiny_vlm`: a tiny random LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL (``prunelab.common.tiny_vlm``) saved
  with a real transformers processor (the family's image processor, a word-level tokenizer over the tiny
  vocabulary with the family's image tokens, a chat template), so ``from_pretrained`` loads it like a hub model.
- :func:`write_shapes_task`: ``prunelab_shapes``, a POPE-style yes/no task ("Is there a red square in the
  image?") on drawn images, saved with ``datasets.save_to_disk`` plus its task YAML, for ``--include_path``.

The tiny models are random: their answers are noise, so the task checks the plumbing, not accuracy.
``python -m prunelab.reproductions.vlm_offline DIR`` writes all three model folders and the task into ``DIR``.
"""

from __future__ import annotations

import random
from pathlib import Path

from prunelab.common.tiny_vlm import IMAGE_TOKEN, PAD, QWEN_IMAGE_TOKEN, QWEN_VISION_END, QWEN_VISION_START, VOCAB

__all__ = ["SHAPES_TASK", "save_tiny_vlm", "shapes_doc_to_text", "shapes_doc_to_visual", "shapes_process_results",
           "tiny_processor", "tiny_tokenizer", "write_shapes_task"]

SHAPES_TASK = "prunelab_shapes"
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
EOS = 2
_WORDS = ("<pad>", "<unk>", "<eos>", "user", "assistant", ":", "?", ".", "is", "there", "a", "in", "the", "image",
          "yes", "no", "answer", "with", "one", "word", *COLORS, *SHAPES)
_SPECIAL = {"<image>": IMAGE_TOKEN, "<|vision_start|>": QWEN_VISION_START, "<|vision_end|>": QWEN_VISION_END,
            "<|image_pad|>": QWEN_IMAGE_TOKEN, "<|video_pad|>": QWEN_IMAGE_TOKEN + 1}
_CHAT = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE\n"
         "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:"
         "{% endif %}")


def tiny_tokenizer():
    """A lower-casing word-level tokenizer over the tiny vocabulary (ids < ``VOCAB``) with the image tokens."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_WORDS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), min(_SPECIAL.values()))})
    vocab.update(_SPECIAL)
    assert max(vocab.values()) < VOCAB and vocab["<pad>"] == PAD and vocab["<eos>"] == EOS
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in (*_SPECIAL, "<pad>", "<eos>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def tiny_processor(family: str, model):
    """The transformers processor of ``family`` for ``model`` (a :func:`~prunelab.common.tiny_vlm.tiny_vlm`)."""
    import transformers as tf

    v = model.config.vision_config
    tok = tiny_tokenizer()
    if family in ("llava", "llava_next"):
        size = dict(size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size, "width": v.image_size})
        common = dict(tokenizer=tok, patch_size=v.patch_size, vision_feature_select_strategy="default",
                      num_additional_image_tokens=1, chat_template=_CHAT.replace("IMAGE", "<image>"))
        if family == "llava":
            return tf.LlavaProcessor(image_processor=tf.CLIPImageProcessor(**size), **common)
        image = tf.LlavaNextImageProcessor(image_grid_pinpoints=model.config.image_grid_pinpoints, **size)
        return tf.LlavaNextProcessor(image_processor=image, **common)
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        grid = dict(patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size)
        image = tf.Qwen2VLImageProcessor(min_pixels=16, max_pixels=32 * 32, **grid)
        chat = _CHAT.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
        return tf.Qwen2_5_VLProcessor(image_processor=image, tokenizer=tok, chat_template=chat,
                                      video_processor=Qwen2VLVideoProcessor(**grid))
    raise ValueError(f"family: expected llava, llava_next or qwen2_5_vl, got {family!r}")


def save_tiny_vlm(folder: str | Path, family: str, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model with its processor to ``folder``; returns the folder."""
    from prunelab.common.tiny_vlm import tiny_vlm

    folder = Path(folder)
    model = tiny_vlm(family, seed=seed)
    for cfg in (model.config, model.config.text_config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = EOS, PAD
        if hasattr(cfg, "bos_token_id"):
            cfg.bos_token_id = None
    model.save_pretrained(folder)
    tiny_processor(family, model).save_pretrained(folder)
    return folder


# --- the synthetic task ---------------------------------------------------------------------------------------


def _draw(shape: str, color: str, x: int, y: int, size: int = 48):
    """A ``size`` x ``size`` grey image with one ``color`` ``shape`` of side ``size // 3`` at (x, y)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (128, 128, 128))
    s = size // 3
    box = (x, y, x + s, y + s)
    draw = ImageDraw.Draw(img)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLORS[color])
    return img


def shapes_docs(n: int, seed: int = 0) -> list[dict]:
    """``n`` questions, half with answer yes: the asked colour and shape are drawn or another one is."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        yes = i % 2 == 0
        asked_color = color if yes else rng.choice([c for c in COLORS if c != color])
        docs.append(dict(question_id=i, shape=shape, color=color, x=rng.randrange(0, 32), y=rng.randrange(0, 32),
                         question=f"Is there a {asked_color} {shape} in the image?", answer="yes" if yes else "no"))
    return docs


def shapes_doc_to_visual(doc: dict) -> list:
    return [_draw(doc["shape"], doc["color"], doc["x"], doc["y"])]


def shapes_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    post = (lmms_eval_specific_kwargs or {}).get("post_prompt", "")
    return f"{doc['question']}{post}"


def shapes_process_results(doc: dict, results: list[str]) -> dict:
    pred = results[0].strip().lower()
    return {"shapes_accuracy": float(pred.startswith(doc["answer"]))}


_TASK_YAML = """\
# Written by prunelab.reproductions.vlm_offline.write_shapes_task: a POPE-style yes/no task on drawn shapes.
task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
training_split: train
output_type: generate_until
doc_to_visual: !function prunelab.reproductions.vlm_offline.shapes_doc_to_visual
doc_to_text: !function prunelab.reproductions.vlm_offline.shapes_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function prunelab.reproductions.vlm_offline.shapes_process_results
metric_list:
  - metric: shapes_accuracy
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    post_prompt: " Answer with one word."
metadata:
  version: 0.1
"""


def write_shapes_task(folder: str | Path, n: int = 16, seed: int = 0, train: int = 8) -> Path:
    """Write ``prunelab_shapes`` (``n`` test docs and ``train`` training docs, the source of in-context
    demonstrations, in a ``datasets`` folder, and its task YAML) into ``folder``.

    Pass ``folder`` to lmms-eval as ``--include_path`` (or ``TaskManager(include_path=...)``).
    """
    from datasets import Dataset, DatasetDict

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    DatasetDict(test=Dataset.from_list(shapes_docs(n, seed)),
                train=Dataset.from_list(shapes_docs(train, seed + 1))).save_to_disk(str(data))
    (folder / f"{SHAPES_TASK}.yaml").write_text(_TASK_YAML.format(task=SHAPES_TASK, data=data))
    return folder


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the tiny VLM folders and the prunelab_shapes task.")
    parser.add_argument("out", help="folder to write <family>/ model folders and task/ into")
    parser.add_argument("--docs", type=int, default=16, help="questions in the task")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for family in ("llava", "llava_next", "qwen2_5_vl"):
        print(f"model folder: {save_tiny_vlm(out / family, family)}")
    print(f"task folder (--include-path): {write_shapes_task(out / 'task', n=args.docs)}")


if __name__ == "__main__":
    main()
