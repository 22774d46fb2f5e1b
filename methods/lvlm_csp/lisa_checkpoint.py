"""LISA checkpoints (e.g. ``xinlai/LISA-7B-v1``) from a local folder into :class:`LisaSegmenter`, through the real
loading code: transformers' ``LlavaForConditionalGeneration`` and ``SamModel`` built from configs, then
``load_state_dict(strict=True)`` of the checkpoint's tensors under transformers' names.

A LISA folder is LLaVA's ``save_pretrained`` output of ``LISAForCausalLM``: ``config.json`` (Llama fields plus
LLaVA's ``mm_*``), ``*.safetensors`` or ``pytorch_model*.bin`` shards, and the tokenizer. Its tensors are named

- ``model.embed_tokens`` / ``model.layers.*`` / ``model.norm`` / ``lm_head``: the Llama;
- ``model.mm_projector.weight`` (one linear layer, LLaVA v1) or ``model.mm_projector.{0,2}`` (``mlp2x_gelu``);
- ``model.vision_tower.vision_tower.vision_model.*``: the CLIP tower, when it was saved with the model; otherwise
  ``vision_tower`` names a CLIP checkpoint folder (``openai/clip-vit-large-patch14``), as LISA's own loader reads
  ``mm_vision_tower``;
- ``model.visual_model.*``: SAM in ``segment_anything``'s names (``image_encoder``, ``prompt_encoder``,
  ``mask_decoder``), renamed here to transformers' ``SamModel`` (:func:`sam_key`);
- ``model.text_hidden_fcs.0.{0,2}``: the projection of the ``[SEG]`` state.

transformers' LLaVA replaces placeholder ids by the image features where LISA's code splices them in at id -200, so
one row is appended to the embedding and the head for an ``<image>`` placeholder id
(:attr:`LisaCheckpoint.image_token_id`, the checkpoint's vocabulary size); a prompt holds
``(image_size / patch_size) ** 2`` of them (256 for LISA's CLIP at 224 px) where LISA's prompt has ``<image>``. A
single-linear projector becomes transformers' two-layer projector with the identity as its second layer and
``"linear"`` activation: the same map.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LisaCheckpoint", "load_lisa", "read_state_dict", "sam_key", "sam_vit_h_config"]

_SAM_RULES = (
    (r"^image_encoder\.patch_embed\.proj\.", "vision_encoder.patch_embed.projection."),
    (r"^image_encoder\.blocks\.(\d+)\.norm(\d)\.", r"vision_encoder.layers.\1.layer_norm\2."),
    (r"^image_encoder\.blocks\.", "vision_encoder.layers."),
    (r"^image_encoder\.neck\.0\.", "vision_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "vision_encoder.neck.layer_norm1."),
    (r"^image_encoder\.neck\.2\.", "vision_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "vision_encoder.neck.layer_norm2."),
    (r"^image_encoder\.", "vision_encoder."),
    (r"^prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix$", "shared_image_embedding.positional_embedding"),
    (r"^prompt_encoder\.point_embeddings\.", "prompt_encoder.point_embed."),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    (r"^mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (r"^mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
)
_MLP = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.+)$")


def sam_key(name: str, mlp_layers: int = 3) -> str:
    """transformers' ``SamModel`` name of the ``segment_anything`` parameter ``name``; the decoder's MLPs have
    ``mlp_layers`` linear layers (``layers.0`` -> ``proj_in``, the last -> ``proj_out``, those between ->
    ``layers.{i - 1}``)."""
    m = _MLP.match(name)
    if m:
        i = int(m.group(2))
        part = "proj_in" if i == 0 else "proj_out" if i == mlp_layers - 1 else f"layers.{i - 1}"
        return f"{m.group(1)}.{part}.{m.group(3)}"
    for pattern, repl in _SAM_RULES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def sam_vit_h_config():
    """SAM ViT-H's ``SamConfig`` (LISA's SAM): 1024 px, 16 px patches, width 1280, 32 layers, 16 heads, global
    attention at layers 7, 15, 23, 31, windows of 14."""
    from transformers import SamConfig
    from transformers.models.sam.configuration_sam import SamVisionConfig

    vision = SamVisionConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_dim=5120,
                             global_attn_indexes=[7, 15, 23, 31])
    return SamConfig(vision_config=vision.to_dict())


def read_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` or ``pytorch_model*.bin`` files of ``folder`` (shards merged)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        return {k: v for f in files for k, v in load_file(str(f)).items()}
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"folder: no *.safetensors or pytorch_model*.bin in {folder}")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


@dataclass
class LisaCheckpoint:
    """The loaded model, the ``[SEG]`` id and the ``<image>`` placeholder id its prompts use."""

    model: object  # LisaSegmenter
    seg_token_id: int
    image_token_id: int


def _vision(config: dict, state: dict, vision_tower: str | Path | None) -> tuple[dict, dict]:
    """The CLIP tower's config and its tensors under ``model.vision_tower.``."""
    tower = {k.split("vision_model.", 1)[1]: v for k, v in state.items()
             if "vision_tower" in k and "vision_model." in k}
    if vision_tower is not None:
        folder = Path(vision_tower)
        clip = json.loads((folder / "config.json").read_text())
        clip = clip.get("vision_config", clip)
        tower = tower or {k.split("vision_model.", 1)[1]: v for k, v in read_state_dict(folder).items()
                          if k.startswith("vision_model.")}
    elif tower:
        clip = config.get("vision_config")
        if clip is None:
            raise ValueError("vision_tower: the checkpoint holds the CLIP tower's tensors but no vision_config; give "
                             "the folder of its CLIP checkpoint (mm_vision_tower)")
    else:
        raise ValueError(f"vision_tower: the checkpoint holds no CLIP tower; give the folder of "
                         f"{config.get('mm_vision_tower', 'its CLIP checkpoint')} (LISA reads mm_vision_tower)")
    clip = {k: v for k, v in clip.items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    clip["model_type"] = "clip_vision_model"
    return clip, {f"model.vision_tower.{k}": v for k, v in tower.items() if "position_ids" not in k}


def load_lisa(folder: str | Path, *, vision_tower: str | Path | None = None, sam_config=None,
              seg_token_id: int | None = None, dtype: torch.dtype = torch.float32) -> LisaCheckpoint:
    """A :class:`LisaSegmenter` with the weights of the LISA checkpoint in ``folder``.

    Args:
        folder: the checkpoint folder (``config.json``, weight shards).
        vision_tower: a CLIP checkpoint folder, when ``folder`` holds no tower tensors.
        sam_config: the SAM's ``SamConfig`` (default :func:`sam_vit_h_config`, LISA's).
        seg_token_id: the ``[SEG]`` id; default: ``config.json``'s ``seg_token_idx``, else the tokenizer's id of
            ``[SEG]`` in ``folder``.
    """
    import transformers as tf

    from prunelab.methods.lvlm_csp.lisa import LisaSegmenter

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"folder: no config.json in {folder} (a LISA checkpoint folder holds one)")
    config = json.loads((folder / "config.json").read_text())
    state = read_state_dict(folder)
    lisa = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    clip, tower = _vision(config, state, vision_tower)
    vocab = state["model.embed_tokens.weight"].shape[0]
    text = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "rope_theta",
                                   "hidden_act") if k in config}
    linear = "mm_projector.weight" in lisa
    llava = tf.LlavaConfig(vision_config=clip, text_config=dict(text, model_type="llama", vocab_size=vocab + 1),
                           image_token_id=vocab, vision_feature_layer=config.get("mm_vision_select_layer", -2),
                           vision_feature_select_strategy="default",
                           projector_hidden_act="linear" if linear else "gelu")
    seg = seg_token_id if seg_token_id is not None else config.get("seg_token_idx")
    if seg is None:
        seg = tf.AutoTokenizer.from_pretrained(str(folder)).convert_tokens_to_ids("[SEG]")
    sam = tf.SamModel._from_config(sam_config if sam_config is not None else sam_vit_h_config(), dtype=dtype)
    model = LisaSegmenter(tf.LlavaForConditionalGeneration._from_config(llava, dtype=dtype), sam, int(seg))

    out = {f"vlm.{k}": v for k, v in tower.items()}
    for k, v in lisa.items():
        if k.startswith(("embed_tokens.", "layers.", "norm.")):
            out[f"vlm.model.language_model.{k}"] = v
        elif k.startswith("mm_projector."):
            part = k[len("mm_projector."):]
            out[f"vlm.model.multi_modal_projector.{'linear_1.' + part if linear else _mlp2x(part)}"] = v
        elif k.startswith("visual_model."):
            out[f"sam.{sam_key(k[len('visual_model.'):])}"] = v
        elif k.startswith("text_hidden_fcs.0."):
            out[f"text_hidden_fcs.{k[len('text_hidden_fcs.0.'):]}"] = v
    out["vlm.lm_head.weight"] = state["lm_head.weight"]
    for name in ("vlm.model.language_model.embed_tokens.weight", "vlm.lm_head.weight"):  # the <image> row
        out[name] = torch.cat([out[name], out[name].new_zeros(1, out[name].shape[1])])
    if linear:  # transformers' second projector layer as the identity
        width = out["vlm.model.multi_modal_projector.linear_1.weight"].shape[0]
        out["vlm.model.multi_modal_projector.linear_2.weight"] = torch.eye(width)
        out["vlm.model.multi_modal_projector.linear_2.bias"] = torch.zeros(width)
    pe = out.get("sam.shared_image_embedding.positional_embedding")
    if pe is not None:
        out["sam.prompt_encoder.shared_embedding.positional_embedding"] = pe
    model.load_state_dict({k: v.to(dtype) for k, v in out.items()}, strict=True)
    return LisaCheckpoint(model.to(dtype).eval(), int(seg), vocab)


def _mlp2x(part: str) -> str:
    index, rest = part.split(".", 1)
    return {"0": "linear_1.", "2": "linear_2."}[index] + rest
