"""A tiny LISA-style model and its checkpoint folder in LISA's format (LISA's and segment_anything's tensor names),
for the loader's and the full preset's tests."""

from __future__ import annotations

import json
import re

import torch
from vlm_helpers import tiny_sam

from prunelab.common.tiny_vlm import tiny_vlm
from prunelab.methods.lvlm_csp.lisa import LisaSegmenter

SEG = 101

# transformers' SamModel name -> segment_anything's (the names of SAM's own checkpoint, inside LISA's visual_model)
SA_NAMES = (
    (r"^vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^vision_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^vision_encoder\.layers\.", "image_encoder.blocks."),
    (r"^vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (r"^vision_encoder\.", "image_encoder."),
    (r"^shared_image_embedding\.positional_embedding$", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^(mask_decoder\.transformer\.layers\.\d+)\.layer_norm(\d)\.", r"\1.norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
    (r"(hypernetworks_mlps\.\d+|iou_prediction_head)\.layers\.0\.", r"\1.layers.1."),
    (r"\.proj_in\.", ".layers.0."),
    (r"\.proj_out\.", ".layers.2."),
)


def _sa(name: str) -> str:
    for pattern, repl in SA_NAMES:
        name = re.sub(pattern, repl, name)
    return name


def segmenter(linear: bool) -> LisaSegmenter:
    import transformers as tf

    vlm = tiny_vlm("llava")
    if linear:  # LLaVA v1's one-layer projector
        config = vlm.config
        config.projector_hidden_act = "linear"
        torch.manual_seed(2)
        vlm = tf.LlavaForConditionalGeneration(config).eval()
    sam = tiny_sam()
    for module in sam.modules():  # default init: mask logits of order 1, so "same masks" says something
        if module is not sam and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    torch.manual_seed(3)
    return LisaSegmenter(vlm, sam, SEG).eval()


def write_lisa(folder, model: LisaSegmenter, *, linear: bool, tower_inside: bool):
    """``model`` as a LISA checkpoint folder (and a CLIP folder beside it); the CLIP folder's path."""
    from safetensors.torch import save_file

    state, clip = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith("vlm.model.language_model."):
            state[f"model.{k[len('vlm.model.language_model.'):]}"] = v
        elif k == "vlm.lm_head.weight":
            state["lm_head.weight"] = v
        elif k.startswith("vlm.model.vision_tower."):
            clip[f"vision_model.{k[len('vlm.model.vision_tower.'):]}"] = v
        elif k.startswith("vlm.model.multi_modal_projector.") and not linear:
            layer = {"linear_1": "0", "linear_2": "2"}[k.split(".")[3]]
            state[f"model.mm_projector.{layer}.{k.split('.')[-1]}"] = v
        elif k.startswith("text_hidden_fcs."):
            state[f"model.text_hidden_fcs.0.{k[len('text_hidden_fcs.'):]}"] = v
        elif k.startswith("sam.") and not k.startswith("sam.prompt_encoder.shared_embedding."):
            state[f"model.visual_model.{_sa(k[len('sam.'):])}"] = v
    if linear:  # the composition of the tiny model's two layers (linear activation) as LLaVA v1's one layer
        p = model.vlm.model.multi_modal_projector
        state["model.mm_projector.weight"] = p.linear_2.weight @ p.linear_1.weight
        state["model.mm_projector.bias"] = p.linear_2.weight @ p.linear_1.bias + p.linear_2.bias
    if tower_inside:
        state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in clip.items()})
    state = {k: v.contiguous().clone() for k, v in state.items()}
    lisa_dir, clip_dir = folder / "lisa", folder / "clip"
    lisa_dir.mkdir()
    clip_dir.mkdir()
    text = model.vlm.config.text_config
    config = {k: getattr(text, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                                            "max_position_embeddings", "hidden_act")}
    config.update(architectures=["LISAForCausalLM"], mm_vision_select_layer=model.vlm.config.vision_feature_layer,
                  mm_vision_tower="openai/clip-vit-large-patch14", rope_theta=10000.0)
    (lisa_dir / "config.json").write_text(json.dumps(config))
    save_file(state, str(lisa_dir / "model.safetensors"))
    (clip_dir / "config.json").write_text(json.dumps({"vision_config": model.vlm.config.vision_config.to_dict()}))
    save_file({k: v.contiguous().clone() for k, v in clip.items()}, str(clip_dir / "model.safetensors"))
    return lisa_dir, clip_dir
