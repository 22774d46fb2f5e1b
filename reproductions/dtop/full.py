"""Full preset: DToP on ADE20K with a SegViT-style ViT-B/16 or ViT-L/16 segmenter (ATM heads), as the official configs.

No checkpoints were released with the paper, so ``--checkpoint`` is a state dict of a
:class:`~prunelab.methods.dtop.Segmenter`: stage A, or stage B fine-tuned with DToP, as
``prunelab.reproductions.dtop.train`` writes them with the configs' recipe. Data: ``--ade20k`` is the
``ADEChallengeData2016`` folder (``images/validation/*.jpg``, ``annotations/validation/*.png``), read as mmseg does:
resized with the aspect kept (ViT-B: at most 2048 x 512; ViT-L: 2560 x 640), labels with zero as "other" (ignored)
and classes 1-150 as 0-149. Inference slides the configs' window (ViT-B: 512 crop, stride 341; ViT-L: 640 / 320);
all windows of an image run as one batch, which DToP prunes per window. GFLOPs are each image's MACs over its
windows (heads included) / 1e9, averaged over the images.

Several GPUs: ``accelerate launch -m prunelab.cli reproduce dtop --preset full --ade20k DIR --checkpoint FILE``;
images are sharded by accelerate and the confusion matrices and MACs gathered.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from prunelab.cli import NON_NEGATIVE, POSITIVE, UNIT, existing
from prunelab.common.provenance import markdown_table, provenance, write_results
from prunelab.methods.dtop import DToP, Segmenter

CONFIGS = {  # the official configs prune_segvit_ade20k and prune_segvit_ade20k_large
    "vit_b": {"timm": "vit_base_patch16_384", "crop": 512, "stride": 341, "scale": (2048, 512),
              "stage_ends": (5, 7, 11), "p0": 0.9, "atm_heads": 6},
    "vit_l": {"timm": "vit_large_patch16_384", "crop": 640, "stride": 320, "scale": (2560, 640),
              "stage_ends": (7, 15, 23), "p0": 0.95, "atm_heads": 8},
    # a 4-block, width-64 encoder on 64 px windows: the pipeline's end-to-end check on CPU, not a paper setting
    "smoke": {"timm": "vit_tiny_patch16_224", "crop": 64, "stride": 43, "scale": (256, 64), "stage_ends": (1, 2, 3),
              "p0": 0.9, "atm_heads": 2, "timm_kwargs": {"depth": 4, "embed_dim": 64, "num_heads": 2}},
}
NUM_CLASSES = 150
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # the configs' data_preprocessor (RGB)
COLUMNS = ["method", "p0", "gflops", "gflops_change_%", "miou", "miou_change", "paper_miou", "paper_gflops"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ade20k", type=existing("dir"), required=True,
                        help="ADEChallengeData2016 folder (images/validation, annotations/validation)")
    parser.add_argument("--model", choices=sorted(CONFIGS), default="vit_b", help="segmenter config")
    parser.add_argument("--checkpoint", type=existing("file"), default=None,
                        help="state dict of a prunelab Segmenter (.safetensors or torch .pth); required unless "
                             "--no-pretrained")
    parser.add_argument("--p0", type=UNIT, default=None, help="DToP threshold (default: the config's)")
    parser.add_argument("--k", type=NON_NEGATIVE, default=5, help="easy tokens kept per class (official: 5)")
    parser.add_argument("--limit", type=POSITIVE, default=None, help="evaluate only the first N images (smoke runs)")
    parser.add_argument("--no-pretrained", action="store_true",
                        help="random weights (pipeline checks only; mIoU is meaningless)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def expected() -> dict:
    return yaml.safe_load(Path(__file__).with_name("expected.yaml").read_text())


def build(name: str, **timm_kwargs) -> Segmenter:
    """The config's segmenter: a timm ViT without class token or final norm, ATM heads (width half the encoder's)."""
    c = CONFIGS[name]
    return Segmenter.create(c["timm"], NUM_CLASSES, stage_ends=c["stage_ends"], head="atm",
                            head_kwargs={"heads": c["atm_heads"]}, img_size=c["crop"],
                            **{**c.get("timm_kwargs", {}), **timm_kwargs})


def load_checkpoint(model: Segmenter, path: str) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state, strict=True)


def ade20k_pairs(root: str | Path, limit: int | None = None) -> list[tuple[Path, Path]]:
    """(image, annotation) paths of the validation split, sorted by name."""
    root = Path(root)
    images = sorted((root / "images" / "validation").glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"--ade20k: no images/validation/*.jpg under {root}")
    pairs = [(p, root / "annotations" / "validation" / f"{p.stem}.png") for p in images]
    missing = [a for _, a in pairs if not a.is_file()]
    if missing:
        raise FileNotFoundError(f"--ade20k: {len(missing)} annotations missing, e.g. {missing[0]}")
    return pairs[:limit] if limit else pairs


def read_pair(image: Path, annotation: Path, scale: tuple[int, int] = (2048, 512)
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised image [3, h, w] resized as mmseg's test pipeline (long side at most ``scale[0]``, short side
    at most ``scale[1]``), and the label map [H, W] (original size, 0-149, 255 ignored)."""
    from PIL import Image

    img = Image.open(image).convert("RGB")
    w, h = img.size
    scale = min(scale[0] / max(w, h), scale[1] / min(w, h))
    img = img.resize((int(w * scale + 0.5), int(h * scale + 0.5)), Image.BILINEAR)
    x = (torch.from_numpy(np.asarray(img, dtype=np.float32)) - torch.tensor(MEAN)) / torch.tensor(STD)
    label = torch.from_numpy(np.asarray(Image.open(annotation), dtype=np.int64))
    label = torch.where(label == 0, 255, label - 1)  # reduce_zero_label
    return x.permute(2, 0, 1), label


def slide(model: Segmenter, x: torch.Tensor, crop: int, stride: int, handle=None) -> tuple[torch.Tensor, float]:
    """Sliding-window scores [C, h, w] of one image and its MACs (all windows, as one batch)."""
    _, h, w = x.shape
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    x = F.pad(x, (0, pw, 0, ph))
    H, W = x.shape[1:]
    ys = list(range(0, max(H - crop, 0) + 1, stride))
    xs = list(range(0, max(W - crop, 0) + 1, stride))
    ys += [H - crop] if ys[-1] != H - crop else []
    xs += [W - crop] if xs[-1] != W - crop else []
    corners = [(y, x0) for y in ys for x0 in xs]
    windows = torch.stack([x[:, y:y + crop, x0:x0 + crop] for y, x0 in corners])
    scores = model(windows)
    total = torch.zeros(scores.shape[1], H, W, device=x.device)
    count = torch.zeros(1, H, W, device=x.device)
    for s, (y, x0) in zip(scores, corners):
        total[:, y:y + crop, x0:x0 + crop] += s
        count[:, y:y + crop, x0:x0 + crop] += 1
    macs = float(handle.state.macs(model).sum()) if handle is not None else model.dense_macs() * len(corners)
    return (total / count)[:, :h, :w], macs


@torch.inference_mode()
def evaluate(model: Segmenter, pairs, method, accelerator, cfg: dict, progress: bool) -> tuple[float, float]:
    """mIoU (%) and mean GFLOPs over ``pairs`` with ``method`` applied (``None``: dense)."""
    from tqdm.auto import tqdm

    import prunelab
    from prunelab.reproductions.testbeds.segmenter import confusion, miou

    conf = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=accelerator.device)
    macs = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine = pairs[accelerator.process_index::accelerator.num_processes]
    handle = prunelab.apply(model, method) if method is not None else None
    try:
        for image, annotation in tqdm(mine, disable=not (progress and accelerator.is_main_process)):
            x, label = read_pair(image, annotation, cfg["scale"])
            scores, m = slide(model, x.to(accelerator.device), cfg["crop"], cfg["stride"], handle)
            scores = F.interpolate(scores[None], size=label.shape, mode="bilinear", align_corners=False)[0]
            label = label.to(accelerator.device)
            keep = label != 255
            conf += confusion(scores.argmax(0)[keep], label[keep], NUM_CLASSES)
            macs += torch.tensor([m, 1.0], dtype=torch.float64, device=accelerator.device)
    finally:
        if handle is not None:
            handle.remove()
    conf, macs = accelerator.reduce(conf, "sum"), accelerator.reduce(macs, "sum")
    return miou(conf.cpu()), float(macs[0] / macs[1] / 1e9)


def run(args: argparse.Namespace, out: Path) -> dict:
    from accelerate import Accelerator

    if args.checkpoint is None and not args.no_pretrained:
        raise SystemExit("--checkpoint: required (no DToP checkpoints were released); --no-pretrained checks the "
                         "pipeline on random weights")
    accelerator = Accelerator()
    cfg = CONFIGS[args.model]
    model = build(args.model)
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
    model = model.eval().to(accelerator.device)
    pairs = ade20k_pairs(args.ade20k, args.limit)
    p0 = cfg["p0"] if args.p0 is None else args.p0
    paper = expected().get(args.model, {"source": "n/a (not a paper setting)", "dense": {}, "dtop": {}})
    rows = []
    for name, method in (("dense", None), ("DToP", DToP(p0=p0, k=args.k))):
        m, g = evaluate(model, pairs, method, accelerator, cfg, not args.no_progress)
        key = "dense" if method is None else "dtop"
        rows.append({"method": name, "p0": "" if method is None else p0, "gflops": g, "miou": m,
                     "paper_miou": paper[key].get("miou", "n/a"), "paper_gflops": paper[key].get("gflops", "n/a")})
    for r in rows:
        r["gflops_change_%"] = 100 * (r["gflops"] / rows[0]["gflops"] - 1)
        r["miou_change"] = r["miou"] - rows[0]["miou"]
    result = {"rows": rows}
    if accelerator.is_main_process:
        meta = provenance(preset="full", model=args.model, config=cfg, checkpoint=str(args.checkpoint),
                          pretrained=not args.no_pretrained, n_images=len(pairs), k=args.k,
                          processes=accelerator.num_processes, paper_source=paper["source"])
        write_results(out, "table", rows, meta, COLUMNS, title=f"DToP, full preset: ADE20K, {args.model}")
        print(markdown_table(rows, COLUMNS))
        result["provenance"] = meta
    return result


def default_out() -> Path:
    return Path("runs") / "dtop" / "full"
