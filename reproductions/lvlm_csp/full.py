"""``prunelab reproduce lvlm_csp --preset full``: LVLM_CSP in a LISA checkpoint on ReasonSeg or RefCOCO(+/g).

A LISA checkpoint folder (``xinlai/LISA-7B-v1`` downloaded, with its tokenizer) loads through
:func:`~prunelab.methods.lvlm_csp.lisa_checkpoint.load_lisa`; the data come from path arguments
(:mod:`.data`). Every query runs as LISA evaluates it: the ``llava_v1`` prompt with ``[SEG].`` teacher-forced
(:mod:`prunelab.methods.lvlm_csp.lisa_prompt`), the picture through the CLIP processor of ``--vision-tower`` and
through transformers' ``SamImageProcessor`` (longest side to SAM's input size, padded), SAM's mask logits upsampled
back to the picture and cut at 0; the queries of one picture run as one batch. gIoU and cIoU are LISA's.

Rows: dense; LVLM_CSP at each ``--settings`` (N_c, N_keep, L1, L2; default the two settings this repo takes as the
abstract's 65 % and 70 % points: 32, 32, 8, 16 and 32, 16, 8, 16); and at each setting's image tokens per layer the
one-stage ``[SEG]`` baseline (all tokens until layer 1, then the top ones) and random tokens before layer 0
(``--baselines``). ``visual_%`` is the image tokens per layer averaged over the layers, measured on the run, as a
share of the image's tokens; ``s_per_query`` the wall time per query of the VLM, the mask decoder and the
post-processing (SAM's encoder runs once per picture, outside it; not interleaved with dense: a rough figure).
Offline, the same path runs on tiny folders (``tests/test_reproduction_lvlm_csp_full.py``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

import prunelab
from prunelab.cli import POSITIVE, existing
from prunelab.common.provenance import provenance, write_results
from prunelab.methods.baselines import RandomPrune
from prunelab.methods.lvlm_csp import LVLMCSP, SegPrune, mean_image_tokens
from prunelab.methods.lvlm_csp.lisa import SEG_STATES
from prunelab.methods.lvlm_csp.lisa_checkpoint import load_lisa
from prunelab.methods.lvlm_csp.lisa_prompt import lisa_conversation, lisa_input_ids
from prunelab.reproductions.lvlm_csp import data

__all__ = ["COLUMNS", "DATASETS", "add_arguments", "default_out", "parse_setting", "run"]

DATASETS = ("reasonseg", *data.REFER_SPLIT_BY)
COLUMNS = ["method", "setting", "visual_%", "giou", "giou_se", "ciou", "n", "s_per_query"]
DEFAULT_SETTINGS = ((32, 32, 8, 16), (32, 16, 8, 16))
BASELINES = ("seg_one_stage", "random")


def parse_setting(text: str) -> tuple[int, int, int, int]:
    """``"32,16,8,16"`` -> (N_c, N_keep, L1, L2), each a positive integer with L1 < L2."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected N_c,N_keep,L1,L2 (four positive integers), got {text!r}")
    c, k, l1, l2 = (int(p) for p in parts)
    if l1 >= l2:
        raise argparse.ArgumentTypeError(f"expected L1 < L2, got L1 {l1}, L2 {l2}")
    return c, k, l1, l2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=existing("dir"), required=True, help="LISA checkpoint folder (with tokenizer)")
    parser.add_argument("--vision-tower", type=existing("dir"), default=None,
                        help="CLIP checkpoint folder (mm_vision_tower: openai/clip-vit-large-patch14); its image "
                             "processor prepares the pictures, and its weights load when the checkpoint holds none")
    parser.add_argument("--sam-config", type=existing("file"), default=None,
                        help="SamConfig JSON of the checkpoint's SAM (default: SAM ViT-H, LISA's)")
    parser.add_argument("--dataset", choices=DATASETS, default="reasonseg")
    parser.add_argument("--data", type=existing("dir"), required=True,
                        help="ReasonSeg: the split folder (ReasonSeg/val); RefCOCO(+/g): LISA's refer_seg folder")
    parser.add_argument("--split", default="val", help="refer split (val, testA, testB, test); ReasonSeg: a label")
    parser.add_argument("--settings", type=parse_setting, nargs="+", default=list(DEFAULT_SETTINGS),
                        metavar="N_c,N_keep,L1,L2")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES))
    parser.add_argument("--selector", default="uniform", help="LVLM_CSP's representatives (uniform, random, cls)")
    parser.add_argument("--scatter-mode", default="add_rep_delta")
    parser.add_argument("--seg-state", choices=SEG_STATES, default="emitting")
    parser.add_argument("--limit", type=POSITIVE, default=None, help="pictures (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="auto: bfloat16 on a GPU (LISA's evaluation precision), float32 on a CPU")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def default_out() -> Path:
    return Path("runs/lvlm_csp/full")


def _processors(args, sam_size: int):
    """The checkpoint's tokenizer, the CLIP image processor and SAM's (longest side to ``sam_size``, padded)."""
    from transformers import AutoTokenizer, CLIPImageProcessor, SamImageProcessor

    source = next((Path(p) for p in (args.vision_tower, args.model)
                   if p is not None and (Path(p) / "preprocessor_config.json").is_file()), None)
    if source is None:
        raise FileNotFoundError("vision_tower: no preprocessor_config.json in --vision-tower or --model; give the "
                                "CLIP checkpoint folder LISA names in mm_vision_tower")
    sam = SamImageProcessor(size={"longest_edge": sam_size}, pad_size={"height": sam_size, "width": sam_size})
    return AutoTokenizer.from_pretrained(str(args.model)), CLIPImageProcessor.from_pretrained(str(source)), sam


def _samples(args):
    if args.dataset == "reasonseg":
        return data.reasonseg(args.data, args.limit)
    return data.refer(args.data, args.dataset, args.split, limit=args.limit)


def _methods(model, seg: int, n: int, layers: int, args) -> list[tuple[str, str, object]]:
    """(method, setting, method object) rows: dense, then per setting LVLM_CSP and its equal-FLOPs baselines."""
    out = [("dense", f"all {n} image tokens", None)]
    for c, k, l1, l2 in args.settings:
        name = f"N_c {c}, N_keep {k}, L1 {l1}, L2 {l2}"
        out.append(("LVLM_CSP", name, LVLMCSP.for_model(model.vlm, clusters=c, keep=k, scatter_layer=l1,
                                                        prune_layer=l2, selector=args.selector,
                                                        scatter_mode=args.scatter_mode, seg_token_id=seg,
                                                        seed=args.seed)))
        mean = mean_image_tokens(n, min(c, n), min(k, n), l1, l2, layers)
        one_stage = round((layers * mean - n) / (layers - 1))
        if "seg_one_stage" in args.baselines and 1 <= one_stage <= n:
            out.append(("[SEG] one-stage", f"keep {one_stage} from layer 1 (= {name})",
                        SegPrune(keep=one_stage, layer=1, seg_token_id=seg)))
        if "random" in args.baselines:
            out.append(("random", f"{round(mean)} tokens before layer 0 (= {name})",
                        RandomPrune(budget=max(1, round(mean)), seed=args.seed)))
    return out


@torch.no_grad()
def run(args: argparse.Namespace, out: Path) -> dict:
    from transformers import SamConfig

    from prunelab.reproductions.vlm_tiny import mean_visual

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]
    sam_config = SamConfig.from_json_file(str(args.sam_config)) if args.sam_config else None
    ckpt = load_lisa(args.model, vision_tower=args.vision_tower, sam_config=sam_config, dtype=dtype)
    model = ckpt.model.to(device)
    model.seg_state = args.seg_state
    tokenizer, clip, sam_proc = _processors(args, model.sam.config.vision_config.image_size)
    vcfg = model.vlm.config.vision_config
    n = (vcfg.image_size // vcfg.patch_size) ** 2
    layers = model.vlm.config.get_text_config().num_hidden_layers
    config = json.loads((Path(args.model) / "config.json").read_text())
    im_start_end = bool(config.get("mm_use_im_start_end", True))
    methods = _methods(model, ckpt.seg_token_id, n, layers, args)
    overlaps = [[] for _ in methods]
    shares = [[] for _ in methods]
    seconds = [0.0 for _ in methods]
    for sample in tqdm(_samples(args), desc=f"LVLM_CSP full ({args.dataset} {args.split})", unit="picture"):
        prompts = [lisa_conversation(data.question(t, s), im_start_end=im_start_end) for t, s in sample.queries]
        ids, mask = lisa_input_ids(tokenizer, prompts, ckpt.image_token_id, n)
        pixels = clip(images=sample.image, return_tensors="pt")["pixel_values"].to(device, dtype)
        sam_in = sam_proc(images=np.asarray(sample.image), return_tensors="pt")
        emb = model.sam.get_image_embeddings(sam_in["pixel_values"].to(device, dtype))
        x = dict(input_ids=ids.to(device), attention_mask=mask.to(device),
                 pixel_values=pixels.expand(len(prompts), -1, -1, -1),
                 image_embeddings=emb.expand(len(prompts), -1, -1, -1), logits_to_keep=1)
        for i, (_, _, method) in enumerate(methods):
            start = time.perf_counter()
            if method is None:
                logits = torch.cat(model(**x).masks)
                shares[i].append(1.0)
            else:
                with prunelab.apply(model.vlm, method) as h:
                    logits = torch.cat(model(**x).masks)
                    shares[i].append(mean_visual(h, layers) / (n * len(prompts)))
            pred = sam_proc.post_process_masks([logits[:, None].float().cpu()], sam_in["original_sizes"],
                                               sam_in["reshaped_input_sizes"])[0][:, 0]
            seconds[i] += time.perf_counter() - start
            overlaps[i] += [data.ious(p.numpy(), t) for p, t in zip(pred, sample.masks)]
    if not overlaps[0]:
        raise ValueError("data: no queries were read")
    rows = []
    for (method, setting, _), o, s, t in zip(methods, overlaps, shares, seconds):
        score = data.scores(o)
        rows.append({"method": method, "setting": setting, "visual_%": 100 * float(np.mean(s)), **score,
                     "s_per_query": t / score["n"]})
    meta = provenance(preset="full", model=str(Path(args.model).name), dataset=args.dataset, split=args.split,
                      pictures=args.limit or "all", dtype=str(dtype).replace("torch.", ""), device=str(device),
                      seg_state=args.seg_state, selector=args.selector, scatter_mode=args.scatter_mode,
                      image_tokens=n, llm_layers=layers,
                      evaluation="LISA's: llava_v1 prompt, [SEG]. teacher-forced, SAM logits > 0 at the picture's "
                                 "size; gIoU the mean per-query IoU (empty union: 1), cIoU total I / total U, "
                                 "ignore pixels left out")
    out = Path(out)
    write_results(out, "full", rows, meta, COLUMNS, f"LVLM_CSP full: {args.dataset} {args.split}")
    plt.close(_plot(rows, out / "full.png"))
    print(f"LVLM_CSP full: tables in {out}")
    return {"rows": rows}


def _plot(rows, path):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric in zip(axes, ("giou", "ciou")):
        for method, marker in (("LVLM_CSP", "o"), ("[SEG] one-stage", "s"), ("random", "^")):
            pts = sorted((r["visual_%"], r[metric]) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker=marker, ls="", label=method)
        ax.axhline(rows[0][metric], color="k", ls="--", lw=1, label="dense")
        ax.set_xlabel("image tokens per LLM layer, % of the image's")
        ax.set_ylabel(metric.replace("iou", "IoU"))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
