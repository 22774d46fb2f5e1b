"""LISA's evaluation prompts as token ids for :class:`~prunelab.methods.lvlm_csp.lisa.LisaSegmenter`.

LISA evaluates with LLaVA's ``llava_v1`` conversation and the answer teacher-forced (``ValDataset`` and
``collate_fn`` in LISA's ``utils/dataset.py``)::

    {system} USER: <im_start><image><im_end>\\n {question} ASSISTANT: [SEG].</s>

``<im_start>`` / ``<im_end>`` wrap the image when the checkpoint was trained with them (``mm_use_im_start_end``;
LISA's default). The text around ``<image>`` is tokenized chunk by chunk and joined with the image placeholder
(LLaVA's ``tokenizer_image_token``): every chunk is tokenized on its own, and when the tokenizer adds a BOS token,
the prompt keeps the first chunk's and drops the others'. transformers' LLaVA then takes one placeholder per image
token where LISA's code splices the features in at one id, so the placeholder is repeated ``image_tokens`` times.
"""

from __future__ import annotations

import torch

__all__ = ["LLAVA_V1_SYSTEM", "lisa_conversation", "lisa_input_ids"]

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")


def lisa_conversation(question: str, *, im_start_end: bool = True, answer: str = "[SEG].") -> str:
    """The ``llava_v1`` conversation of one question about one image, the answer ``answer`` included."""
    image = "<im_start><image><im_end>" if im_start_end else "<image>"
    return f"{LLAVA_V1_SYSTEM} USER: {image}\n {question} ASSISTANT: {answer}</s>"


def lisa_input_ids(tokenizer, prompts: list[str], image_token_id: int, image_tokens: int,
                   pad_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [B, L] of ``prompts`` (each with one ``<image>``), right-padded as LISA's
    collate pads; the image placeholder ``image_token_id`` repeated ``image_tokens`` times."""
    if image_tokens < 1:
        raise ValueError(f"image_tokens: expected >= 1, got {image_tokens}")
    bos = tokenizer.bos_token_id
    rows = []
    for prompt in prompts:
        chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
        if len(chunks) != 2:
            raise ValueError(f"prompts: expected one <image> per prompt, got {len(chunks) - 1} in {prompt!r}")
        lead = chunks[0][:1] if bos is not None and chunks[0][:1] == [bos] else []
        body = [c[len(lead):] for c in chunks]
        rows.append(lead + body[0] + [image_token_id] * image_tokens + body[1])
    pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0  # LISA pads with unk
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask
