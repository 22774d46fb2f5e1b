"""The segmentation test-bed: a plain-ViT segmenter with auxiliary heads, trained on Fashion-MNIST canvases.

Stage A (:func:`train` with no method) trains the encoder and every head with nothing pruned, as DToP's base
model; stage B (``method=DToP(...)``) fine-tunes that model with early exit active (the official code's recipe: every
head keeps its segmentation loss, selection runs without gradients). Both ship as fp16 weights with their config,
recipe and test scores in the metadata, and SHA-256 checksums (:data:`SHA256`), so nothing trains on a new machine;
``python -m prunelab.reproductions.testbeds.segmenter`` retrains them.

The encoder is a timm ViT of 6 blocks, width 96, 3 heads, on 48 x 48 one-channel canvases in 4 px patches (a 12 x 12
grid of 144 tokens, no class token); linear heads after the 0-based blocks 2, 3 and 5, the positions of ViT-B's
5, 7 and 11 scaled to half the depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import timm
import torch
from tqdm.auto import tqdm

import prunelab
from prunelab.methods.dtop import DToP, Segmenter
from prunelab.reproductions.testbeds import shipped
from prunelab.reproductions.testbeds.scenes import NUM_CLASSES, SIZE, Canvases, make_canvases
from prunelab.reproductions.testbeds.training import warmup_cosine

WEIGHTS = {"base": Path(__file__).with_name("weights") / "segmenter.safetensors",
           "dtop": Path(__file__).with_name("weights") / "segmenter_dtop.safetensors"}
SHA256 = {"base": "c6c77a289a3b60e29e4516587beac22dbc2e205498bb801e38c8c752ae2bc9ad",
          "dtop": "cfe7b219373a1fb1349889a380e8586818d6ca75f3e0b3979651ce85a8c67c88"}
COMMAND = "python -m prunelab.reproductions.testbeds.segmenter"


@dataclasses.dataclass(frozen=True)
class SegConfig:
    """Architecture and the two training stages; the defaults are the shipped test-bed's."""

    embed_dim: int = 96
    depth: int = 6
    num_heads: int = 3
    patch_size: int = 4
    stage_ends: tuple[int, ...] = (2, 3, 5)
    # stage A: fresh canvases (half hard), AdamW with warm-up and cosine decay
    canvases: int = 160_000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    # stage B: DToP's fine-tune with early exit active at finetune_p0 (its lr scaled down from stage A's, as the
    # official recipe fine-tunes at a tenth of a base model's rate)
    finetune_canvases: int = 16_000
    finetune_lr: float = 1e-4
    finetune_p0: float = 0.9
    finetune_k: int = 5
    hard_share: float = 0.5
    seed: int = 0


def build(cfg: SegConfig | None = None) -> Segmenter:
    cfg = SegConfig() if cfg is None else cfg
    return Segmenter.create("vit_tiny_patch16_224", NUM_CLASSES, stage_ends=cfg.stage_ends, img_size=SIZE,
                            patch_size=cfg.patch_size, in_chans=1, embed_dim=cfg.embed_dim, depth=cfg.depth,
                            num_heads=cfg.num_heads)


def train(cfg: SegConfig | None = None, *, method: DToP | None = None, init: Segmenter | None = None,
          data_root: str | None = None, progress: bool = True) -> tuple[Segmenter, dict]:
    """Stage A (``method`` None: a fresh model, nothing pruned) or stage B (``method`` applied to a copy of
    ``init`` during training). Canvases are drawn fresh in seeded chunks of 1,000, so the run is deterministic."""
    cfg = SegConfig() if cfg is None else cfg
    torch.manual_seed(cfg.seed)
    model = build(cfg) if init is None else init
    model.train()
    n, peak = (cfg.canvases, cfg.lr) if method is None else (cfg.finetune_canvases, cfg.finetune_lr)
    opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=cfg.weight_decay)
    handle = prunelab.apply(model, method) if method is not None else None
    bar = tqdm(total=n, desc="train segmenter" if method is None else "fine-tune with DToP", unit="img",
               disable=not progress, dynamic_ncols=True)
    start, seen, chunk, losses = time.perf_counter(), 0, 0, []
    try:
        while seen < n:
            data = make_canvases("train", min(1000, n - seen), seed=cfg.seed * 100_003 + chunk + (method is not None)
                                 * 50_000, hard_share=cfg.hard_share, root=data_root)
            chunk += 1
            for i in range(0, len(data.images), cfg.batch_size):
                x, y = data.images[i:i + cfg.batch_size], data.masks[i:i + cfg.batch_size]
                for g in opt.param_groups:
                    g["lr"] = warmup_cosine(seen / n, peak, cfg.warmup_frac)
                loss = model.loss(model(x, return_heads=True)[1], y)  # every head's cross-entropy, weight 1 each
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                seen += len(x)
                losses.append(round(loss.item(), 4))
                bar.update(len(x))
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        bar.close()
        if handle is not None:
            handle.remove()
    seconds = time.perf_counter() - start
    with torch.no_grad():  # evaluate what ships: fp16 weights
        for t in model.state_dict().values():
            t.copy_(t.half().float())
    model.eval()
    w = min(50, max(1, len(losses) // 4))  # mean loss over the first and last 50 steps (a quarter of short runs)
    info = {"config": dataclasses.asdict(cfg), "stage": "base" if method is None else "dtop",
            "method": None if method is None else {"p0": method.p0, "k": method.k},
            "train_seconds": round(seconds, 1), "canvases_seen": seen,
            "loss_first_last_50": [sum(losses[:w]) / w, sum(losses[-w:]) / w],
            "torch_version": torch.__version__, "timm_version": timm.__version__}
    return model, info


def confusion(pred: torch.Tensor, target: torch.Tensor, classes: int = NUM_CLASSES) -> torch.Tensor:
    """[classes, classes] int64 counts of (target, prediction) pixel pairs."""
    return torch.bincount(target.flatten() * classes + pred.flatten(), minlength=classes * classes).view(classes,
                                                                                                         classes)


def miou(conf: torch.Tensor) -> float:
    """Mean IoU (%) over the classes present in the target or the prediction, from a :func:`confusion` matrix."""
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    seen = union > 0
    return float((inter[seen] / union[seen]).mean() * 100)


@torch.no_grad()
def evaluate(model: Segmenter, data: Canvases, method=None, batch_size: int = 100) -> dict:
    """Scores on ``data`` with ``method`` applied (``None``: the dense segmenter).

    Returns mIoU (%) over all, easy and hard canvases; ``confusion`` [N, C, C], each image's (target, prediction)
    pixel counts (for paired bootstrap errors); mean GFLOPs and ``gflops_per_image`` [N]; and with a method, the
    share of tokens exiting at each stage (all, easy and hard canvases).
    """
    per_image, macs, exits = [], [], []
    handle = prunelab.apply(model, method) if method is not None else None
    try:
        for i in range(0, len(data.images), batch_size):
            x, y = data.images[i:i + batch_size], data.masks[i:i + batch_size]
            pred = model(x).argmax(1)
            per_image += [confusion(p, t) for p, t in zip(pred, y)]
            if handle is None:
                macs.append(torch.full((len(x),), float(model.dense_macs()), dtype=torch.float64))
            else:
                macs.append(handle.state.macs(model))
                exits.append(handle.state.exit_stage)
    finally:
        if handle is not None:
            handle.remove()
    conf, macs = torch.stack(per_image), torch.cat(macs)
    out = {"miou": miou(conf.sum(0)), "miou_easy": miou(conf[~data.hard].sum(0)),
           "miou_hard": miou(conf[data.hard].sum(0)), "gflops": float(macs.mean() / 1e9),
           "gflops_per_image": macs / 1e9, "confusion": conf}
    if exits:
        stage = torch.cat(exits)
        out["exit_share"] = {kind: [float((stage[sel] == s).float().mean()) for s in range(len(model.stages))]
                             for kind, sel in (("all", slice(None)), ("easy", ~data.hard), ("hard", data.hard))}
    return out


def save(model: Segmenter, info: dict, path: str | Path) -> str:
    """fp16 safetensors with ``info`` (JSON) in the metadata; returns the SHA-256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"info": json.dumps(info)})
    return shipped.sha256(path)


def load(stage: str = "base", path: str | Path | None = None, *, check: bool = True) -> tuple[Segmenter, dict]:
    """The trained segmenter (fp32, eval) of ``stage`` ("base": stage A; "dtop": fine-tuned with DToP) and its info.

    The shipped files are checked against :data:`SHA256`; the architecture is rebuilt from the recorded config.
    """
    from safetensors.torch import load_file

    if stage not in WEIGHTS:
        raise ValueError(f"stage: expected one of {sorted(WEIGHTS)}, got {stage!r}")
    path, meta = shipped.metadata(path, WEIGHTS[stage], SHA256[stage], COMMAND, check=check)
    if "info" not in meta:
        raise ValueError(f"path: {path} carries no training info; write it with segmenter.save()")
    info = json.loads(meta["info"])
    cfg = dict(info["config"])
    cfg["stage_ends"] = tuple(cfg["stage_ends"])
    model = build(SegConfig(**cfg))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return model.eval(), info


def _summary(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k not in ("gflops_per_image", "confusion")}


def main(argv: list[str] | None = None) -> dict:
    """Train stage A, evaluate it, fine-tune it with DToP (stage B), evaluate that, and write both weights files."""
    parser = argparse.ArgumentParser(prog=COMMAND, description="Train the segmentation test-bed (both stages).")
    parser.add_argument("--data", metavar="DIR", default=None, help="Fashion-MNIST folder (IDX gz files)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it in the last bits)")
    parser.add_argument("--out", default=str(WEIGHTS["base"].parent), help="folder for the two weights files")
    parser.add_argument("--canvases", type=int, default=None, help="stage A canvases (default: the config's)")
    parser.add_argument("--finetune-canvases", type=int, default=None, help="stage B canvases")
    parser.add_argument("--n-test", type=int, default=2000, help="test canvases for the recorded scores")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("canvases", args.canvases), ("finetune_canvases", args.finetune_canvases))
                 if v is not None}
    cfg = SegConfig(**overrides)
    test = make_canvases("test", args.n_test, seed=0, root=args.data)
    base, info_a = train(cfg, data_root=args.data)
    info_a["test"] = _summary(evaluate(base, test))
    info_a["n_test"] = args.n_test
    digest_a = save(base, info_a, Path(args.out) / WEIGHTS["base"].name)
    print(json.dumps(info_a["test"]), f"base SHA-256 {digest_a}")
    method = DToP(p0=cfg.finetune_p0, k=cfg.finetune_k)
    tuned, info_b = train(cfg, method=method, init=base, data_root=args.data)
    info_b["test"] = _summary(evaluate(tuned, test, method))
    info_b["n_test"] = args.n_test
    digest_b = save(tuned, info_b, Path(args.out) / WEIGHTS["dtop"].name)
    print(json.dumps(info_b["test"]), f"dtop SHA-256 {digest_b}")
    return {"base": info_a, "dtop": info_b}


if __name__ == "__main__":
    main()
