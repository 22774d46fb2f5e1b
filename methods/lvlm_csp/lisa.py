"""A LISA-style reasoning segmenter from transformers parts (Lai et al., "LISA: Reasoning Segmentation via Large
Language Model", CVPR 2024), the host LVLM_CSP prunes.

LISA extends an LLaVA-type VLM with a ``[SEG]`` token. The last hidden state of every ``[SEG]`` in the prompt goes
through ``text_hidden_fcs`` (Linear, ReLU, Linear to SAM's prompt width) and becomes a sparse prompt of SAM's mask
decoder, over SAM's own image embeddings of the same picture (its vision encoder at 1024 px in LISA). Nothing is
forked: the VLM is transformers' ``LlavaForConditionalGeneration`` (or any family of the stage engine), SAM is
transformers' ``SamModel``, and this module only wires them; a pruning method goes in through ``prunelab.apply`` on
the VLM, which is where LVLM_CSP acts.

Which hidden state prompts SAM (``seg_state``): LISA's code takes the last hidden state of the position *before*
each ``[SEG]``, the state that emits ``[SEG]`` (``LISAForCausalLM.model_forward`` marks ``input_ids[:, 1:] ==
seg_token_idx`` and reads the hidden states one position earlier), not the ``[SEG]`` token's own row. That is the
default here (``"emitting"``); ``"own"`` reads the ``[SEG]`` row itself.

When a method has dropped rows, the VLM's last hidden states hold fewer rows than the prompt; the rows are found
through the installed handle's row positions (``VLMState.positions``), never by offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import prunelab

__all__ = ["SEG_STATES", "LisaOutput", "LisaSegmenter"]

SEG_STATES = ("emitting", "own")


@dataclass
class LisaOutput:
    """``masks``: per prompt, the low-resolution mask logits of its ``[SEG]`` tokens ``[n_seg, h, w]`` (SAM's
    decoder output, 4x its embedding grid); ``seg_states``: per prompt, the last hidden states that prompted them
    ``[n_seg, C]`` (``seg_state``); ``logits``: the VLM's logits."""

    masks: list[torch.Tensor]
    seg_states: list[torch.Tensor]
    logits: torch.Tensor


class LisaSegmenter(nn.Module):
    """A VLM, LISA's projection of the ``[SEG]`` state, and SAM's encoder and mask decoder.

    Args:
        vlm: a transformers VLM of the stage engine's families (LISA: LLaVA with a CLIP ViT-L/14 tower).
        sam: a transformers ``SamModel`` (LISA: SAM ViT-H).
        seg_token_id: the ``[SEG]`` token's id in the VLM's vocabulary.
        seg_state: ``"emitting"`` (LISA's: the hidden state of the position before each ``[SEG]``) or ``"own"``
            (the ``[SEG]`` row's).
    """

    def __init__(self, vlm, sam, seg_token_id: int, seg_state: str = "emitting"):
        super().__init__()
        from prunelab.common.validate import check_choice

        check_choice(seg_state, "seg_state", SEG_STATES)
        self.vlm, self.sam, self.seg_token_id, self.seg_state = vlm, sam, int(seg_token_id), seg_state
        width, out = vlm.config.get_text_config().hidden_size, sam.config.prompt_encoder_config.hidden_size
        self.text_hidden_fcs = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out), nn.Dropout(0.0))

    def _row_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: int) -> torch.Tensor:
        """[B, rows] the prompt position of each row of the VLM's last hidden states (-1: padding)."""
        state = getattr(prunelab.handle_of(self.vlm), "state", None)
        positions = getattr(state, "positions", None)
        if positions is not None and positions.shape == (input_ids.shape[0], rows):
            return positions
        if rows != input_ids.shape[1]:
            raise RuntimeError(f"the VLM returned {rows} rows for a prompt of {input_ids.shape[1]} and no pruning "
                               "handle says which they are")
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        return torch.where(valid, torch.arange(rows, device=input_ids.device), -1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                sam_pixel_values: torch.Tensor | None = None, image_embeddings: torch.Tensor | None = None,
                **vlm_inputs) -> LisaOutput:
        """One prefill of the VLM on prompts that hold their ``[SEG]`` tokens (as LISA evaluates, its answer
        ``[SEG]`` teacher-forced), then SAM's decoder per prompt.

        Args:
            input_ids / attention_mask / vlm_inputs: the VLM's inputs (``pixel_values`` and the family's others).
            sam_pixel_values: [B, 3, S, S] the pictures as SAM's encoder takes them (one per prompt), or
            image_embeddings: [B, C_sam, g, g] SAM's embeddings of them, computed once by the caller.
        """
        if (sam_pixel_values is None) == (image_embeddings is None):
            raise ValueError("sam_pixel_values: give SAM's pixel values or its image_embeddings, exactly one")
        has_seg = (input_ids == self.seg_token_id).any(-1)
        if not bool(has_seg.all()):
            raise ValueError(f"input_ids: prompts {(~has_seg).nonzero().flatten().tolist()} hold no [SEG] token "
                             f"({self.seg_token_id})")
        out = self.vlm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **vlm_inputs)
        last = out.hidden_states[-1]
        pos = self._row_positions(input_ids, attention_mask, last.shape[1])
        shift = 1 if self.seg_state == "emitting" else 0
        ahead = (pos + shift).clamp(min=0, max=input_ids.shape[1] - 1)
        is_seg = (pos >= 0) & (pos + shift < input_ids.shape[1]) & (input_ids.gather(1, ahead) == self.seg_token_id)
        found, want = is_seg.sum(-1), (input_ids == self.seg_token_id).sum(-1)
        if not torch.equal(found, want):
            bad = (found != want).nonzero().flatten().tolist()
            raise ValueError(f"seg_state: prompts {bad} lack the row before a [SEG] (a [SEG] first in its prompt, "
                             f"or the row was pruned); LISA reads the state that emits [SEG]")
        if image_embeddings is None:
            image_embeddings = self.sam.get_image_embeddings(sam_pixel_values)
        if image_embeddings.shape[0] != input_ids.shape[0]:
            raise ValueError(f"image_embeddings: one picture per prompt, got {image_embeddings.shape[0]} for "
                             f"{input_ids.shape[0]} prompts")
        grid = image_embeddings.shape[-1]
        image_pe = self.sam.get_image_wide_positional_embeddings()
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, grid, grid)
        masks, states = [], []
        for b in range(input_ids.shape[0]):
            state = last[b, is_seg[b]]
            prompt = self.text_hidden_fcs(state.to(self.text_hidden_fcs[0].weight.dtype))  # [n_seg, C_sam]
            low_res, _ = self.sam.mask_decoder(image_embeddings=image_embeddings[b:b + 1],
                                               image_positional_embeddings=image_pe,
                                               sparse_prompt_embeddings=prompt[None, :, None, :].to(image_pe.dtype),
                                               dense_prompt_embeddings=dense, multimask_output=False)
            masks.append(low_res[0, :, 0])
            states.append(state)
        return LisaOutput(masks, states, out.logits)
