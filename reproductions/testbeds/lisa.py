"""The reasoning-segmentation test-bed: a tiny LISA (``methods/lvlm_csp/lisa.py``) that segments the garment a prompt
names.

Why: LVLM_CSP (``methods/lvlm_csp``) prunes the image tokens of a LISA-style model, and its quality claim is about
masks: that the ``[SEG]`` state still finds the object when most image tokens left the language model. This is a
model whose mask can only be right if the language model read the image.

The task. An 84 px composite of the VLM test-bed's kind (``composites.py``: a 3 x 3 grid of 28 px cells), here with
2 to 6 Fashion-MNIST garments of distinct classes in random cells, and the prompt
``<image>*144 Question: segment the {garment} . Answer: [SEG]`` for one of them; the target is that garment's pixels.
Scored as LISA is: gIoU (the mean of per-sample IoUs) and cIoU (cumulative intersection over cumulative union), the
prediction being the mask logits > 0 at 84 px.

Why not the segmentation canvases of ``scenes.py`` (DToP's test-bed), which the plan was to share: on them (48 px,
textured, overlapping garments, resized to 84 px for the tower) the same recipe trained a model whose masks did not
need the image: gIoU 0.390 dense against 0.382 with the image tokens removed (500 held-out queries, 2,500 + 1,200
steps), and 1,200 more steps with the centroid loss below left the loss where it was. The VLM test-bed's tower was
trained to say which garment is in which cell of a composite; on composites the language model can find the named
garment.

The model is LISA's wiring at a small scale, every part trained here (:func:`main`):

- the VLM test-bed's LLaVA (``vlm.py``: CLIP tower at 84 px, so 144 image tokens, LLaVA projector, 4-layer Llama
  of width 256) with ``segment`` and ``[SEG]`` added to its vocabulary, starting from its shipped weights;
- a small ``SamModel`` (:func:`sam_config`) on the same 84 px picture: 7 px patches, a 12 x 12 embedding grid, mask
  logits at 48 x 48 brought to 84 px;
- LISA's ``text_hidden_fcs`` from the ``[SEG]`` state to SAM's prompt width; the state is the ``[SEG]`` token's own
  last hidden state (``seg_state="own"``), where LISA reads the row before it (the one that emits ``[SEG]``): with
  ``[SEG]`` last in every prompt, both rows see the whole image, and this one was the test-bed's choice.

Training, in two stages:

- **A, SAM** (:func:`pretrain_sam`): SAM's encoder, prompt encoder and decoder learn promptable segmentation the way
  SAM does, class-agnostically: one point on a garment (its embedding from SAM's own prompt encoder, the point token
  alone) asks for that garment. Three things were needed for it to use the point at all (found on the canvases):
  PyTorch's default initialisation (SAM's own; under transformers' N(0, 0.02) the mask logits start nearly constant
  and stayed there), SAM's random Fourier features of position at scale 1 (transformers draws them at half the
  encoder width, a pattern so fine that neighbouring cells are unrelated), and a warm-up on discs around the point
  (without it SAM settled on the union of the garments whatever the point: gIoU 0.40 with and without a point).
- **B, LISA** (:func:`train_lisa`): SAM frozen, the VLM and ``text_hidden_fcs`` learn from the masks (per-pixel
  BCE plus dice, as LISA's mask loss) and, a training aid LISA does not have, the squared distance of SAM's prompt to
  SAM's point embedding of the target's centroid (``point_weight``). LISA freezes SAM's encoder and trains its
  decoder; here the decoder is frozen too, a deviation on purpose: a trainable decoder can learn to find the named
  class in SAM's own features from the class word alone, and then the language model's image tokens, which LVLM_CSP
  prunes, would not matter. With the decoder frozen, the ``[SEG]`` state must say *where* the garment is, which only
  the image tokens tell.
  :func:`held_out` reports the model with the image tokens removed from the language model as well (``text_only``),
  the check that they matter, and SAM prompted at the targets' centroids (:func:`centroid_oracle`), the ceiling of
  this route.

Longer training did not widen the gap the image makes. From the shipped weights, 1,600 more stage-B steps
(``--init`` the shipped file, ``--sam-steps 0 --steps 1600 --seed 2 --lr 3e-4``, 25 minutes) raised the held-out gIoU
from 0.127 to 0.143 (se 0.008) dense, but also from 0.074 to 0.088 without the image tokens: the masks got better
where the image is not needed, and the gap stayed at about 0.055. Those weights were not shipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import prunelab
from prunelab.reproductions.testbeds import composites as C
from prunelab.reproductions.testbeds import shipped, vlm
from prunelab.reproductions.testbeds.fashion import NAMES, load_fashion_mnist
from prunelab.reproductions.testbeds.shipped import sha256
from prunelab.reproductions.testbeds.training import warmup_cosine

PROMPT = "Question: segment the {name} . Answer:"
SEG = "[SEG]"
MAX_ITEMS = 6
INK = 0.2  # a garment pixel brighter than this is the garment's (as the segmentation canvases draw masks)
DISC = 8.0  # pixels: the radius of stage A's warm-up targets
WEIGHTS = Path(__file__).with_name("weights") / "lisa.safetensors"
SHA256 = "d90bda4e18884863c1d79488e69a412d9c3ca9782537a4760a7283a9950d11ab"  # of WEIGHTS; main() prints it
COMMAND = "python -m prunelab.reproductions.testbeds.lisa"

__all__ = ["COMMAND", "INK", "MAX_ITEMS", "PROMPT", "Queries", "Recipe", "SEG", "SHA256", "Scores", "WEIGHTS", "batch",
           "build", "centroid_oracle", "evaluate", "held_out", "load", "main", "mask_loss", "pretrain_sam", "queries",
           "sam_config", "save", "seg_token_id", "sha256", "tokenizer", "train_lisa", "vocabulary"]


# -- vocabulary, data and prompts -----------------------------------------------------------------------------------
def vocabulary() -> tuple[str, ...]:
    """The VLM test-bed's vocabulary, then ``segment`` and ``[SEG]`` (the tokenizer never produces ``[SEG]`` from
    text: :func:`batch` appends its id)."""
    words = vlm.vocabulary()
    return (*words, *(w for w in ("segment", SEG) if w not in words))


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over :func:`vocabulary`."""
    return vlm.word_tokenizer(vocabulary())


def seg_token_id() -> int:
    """The id of ``[SEG]``."""
    return vocabulary().index(SEG)


class Queries(NamedTuple):
    """``images`` [N, 84, 84] composites in [0, 1]; ``targets`` [N, 84, 84] bool, the named garment's pixels;
    ``classes`` [N] the named class; ``cells`` [N] its grid cell; ``items`` [N] the garments on the composite."""

    images: torch.Tensor
    targets: torch.Tensor
    classes: torch.Tensor
    cells: torch.Tensor
    items: torch.Tensor

    def __len__(self) -> int:
        return len(self.classes)

    def take(self, index) -> Queries:
        return Queries(*(t[index] for t in self))


def queries(split: str, n: int, seed: int = 0) -> Queries:
    """``n`` composites of Fashion-MNIST's ``split`` (``"test"``: garments held out from training), each with 2 to
    :data:`MAX_ITEMS` garments of distinct classes in random cells of the 3 x 3 grid, and one of them named; the
    target is its pixels brighter than :data:`INK`."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    images, labels = (t.numpy() for t in load_fashion_mnist(split))
    by_class = [np.flatnonzero(labels == c) for c in range(len(NAMES))]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    sources, targets, classes, cells, items = [], [], [], [], []
    for _ in range(n):
        k = int(rng.integers(2, MAX_ITEMS + 1))
        kinds, where = rng.choice(len(NAMES), k, replace=False), rng.permutation(C.GRID * C.GRID)[:k]
        src = np.full(C.GRID * C.GRID, -1)
        src[where] = [int(rng.choice(by_class[c])) for c in kinds]
        j = int(rng.integers(k))
        only = np.full(C.GRID * C.GRID, -1)
        only[where[j]] = src[where[j]]
        sources.append(src), targets.append(only), classes.append(int(kinds[j])), cells.append(int(where[j]))
        items.append(k)
    pixels = torch.from_numpy(C.render(np.stack(sources), images))
    target = torch.from_numpy(C.render(np.stack(targets), images)) > INK
    return Queries(pixels, target, torch.tensor(classes), torch.tensor(cells), torch.tensor(items))


def sam_pixels(images: torch.Tensor) -> torch.Tensor:
    """[B, 84, 84] composites in [0, 1] -> [B, 3, 84, 84], normalised as the VLM's tower input, gray repeated: SAM's
    input."""
    return C.to_pixels(images)


def batch(q: Queries, tok=None) -> dict:
    """Model inputs for the queries ``q``: ``input_ids`` (144 ``<image>``, the prompt, ``[SEG]``; left padding),
    ``attention_mask``, ``pixel_values`` (the VLM's tower input), ``sam_pixel_values`` (the same picture for SAM)."""
    tok = tok or tokenizer()
    seg = seg_token_id()
    ids = [[vlm.IMAGE_TOKEN] * vlm.TOKENS + tok(PROMPT.format(name=NAMES[int(c)])).input_ids + [seg]
           for c in q.classes]
    return dict(vlm.left_pad(ids), pixel_values=C.to_pixels(q.images), sam_pixel_values=sam_pixels(q.images))


# -- the model ------------------------------------------------------------------------------------------------------
def sam_config():
    """The small ``SamConfig``: an 84 px encoder with 7 px patches, a 12 x 12 grid like the VLM's tower (width 96, 4
    layers, global attention), the prompt encoder and a two-layer mask decoder at width 64 (mask logits at 48 x 48,
    :func:`upsample` brings them to 84)."""
    from transformers import SamConfig
    from transformers.models.sam.configuration_sam import (
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vision = SamVisionConfig(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, image_size=C.SIZE,
                             patch_size=vlm.PATCH, output_channels=64, global_attn_indexes=[0, 1, 2, 3], window_size=0,
                             mlp_dim=384, num_pos_feats=32)
    prompt = SamPromptEncoderConfig(hidden_size=64, image_size=C.SIZE, patch_size=vlm.PATCH, mask_input_channels=16)
    decoder = SamMaskDecoderConfig(hidden_size=64, mlp_dim=256, num_hidden_layers=2, num_attention_heads=4,
                                   iou_head_hidden_dim=64)
    return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                     mask_decoder_config=decoder.to_dict())


def build(seed: int = 0):
    """The untrained test-bed (a ``LisaSegmenter``, fp32, eval) and its tokenizer."""
    import transformers as tf

    from prunelab.methods.lvlm_csp.lisa import LisaSegmenter

    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(vlm.llava_config(vocab_size=len(vocabulary())))
    sam = tf.SamModel(sam_config())
    for module in sam.modules():  # PyTorch's default initialisation, SAM's own (see the module's docstring)
        if module is not sam and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    pe = sam.shared_image_embedding.positional_embedding  # SAM's random Fourier features at scale 1
    pe.data = torch.randn(pe.shape)
    return LisaSegmenter(model, sam, seg_token_id(), seg_state="own").eval(), tokenizer()


def from_vlm(seed: int = 0):
    """:func:`build` with the VLM test-bed's base weights (stages A-B, ``vlm.BASE_WEIGHTS``) in the VLM (the old ids
    are the same words)."""
    model, tok = build(seed)
    vlm.extend_from(model.vlm, vlm.load(base=True)[0])
    return model, tok


def load(path: str | Path | None = None, *, check: bool = True):
    """The trained test-bed (fp32, eval) and its tokenizer from ``path`` (default: the shipped :data:`WEIGHTS`,
    checked against :data:`SHA256`); a file trained with another vocabulary is refused."""
    return shipped.load_with_vocabulary(build, path, WEIGHTS, SHA256, COMMAND, vocabulary(), check=check)


def save(model, info: dict, path: str | Path = WEIGHTS) -> str:
    """Write ``model`` as fp16 safetensors with the vocabulary and ``info`` (JSON) in the metadata; its SHA-256."""
    return shipped.save_with_vocabulary(model, vocabulary(), info, path)


# -- training -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    """Both stages' settings: steps, batch size and peak learning rate (AdamW, warm-up then cosine decay); the share
    of stage A's steps on disc targets (``sam_discs``, :func:`pretrain_sam`); the training queries (``pool``, on
    composites of Fashion-MNIST's training split, one named garment each); stage B's training aids
    (``point_weight``, ``cell_weight``, :func:`train_lisa`)."""

    sam_steps: int = 1500
    sam_batch: int = 32
    sam_lr: float = 1e-3
    sam_discs: float = 0.25
    steps: int = 800
    batch: int = 16
    lr: float = 3e-4
    pool: int = 20_000
    point_weight: float = 1.0
    cell_weight: float = 0.0
    warmup: float = 0.05
    seed: int = 0


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LISA's mask loss on [B, H, W] logits: per-pixel BCE plus the dice loss (weights 2 and 0.5, LISA's)."""
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, t)
    p = logits.sigmoid().flatten(1)
    dice = 1 - (2 * (p * t.flatten(1)).sum(-1) + 1) / (p.sum(-1) + t.flatten(1).sum(-1) + 1)
    return 2.0 * bce + 0.5 * dice.mean()


def _decode(sam, embeddings: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """[B, 84, 84] mask logits of SAM's decoder for one sparse prompt token per image ``sparse`` [B, C]."""
    grid = embeddings.shape[-1]
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(sparse), -1, grid, grid)
    low, _ = sam.mask_decoder(image_embeddings=embeddings, image_positional_embeddings=sam.
                              get_image_wide_positional_embeddings().expand(len(sparse), -1, -1, -1),
                              sparse_prompt_embeddings=sparse[:, None, None, :], dense_prompt_embeddings=dense,
                              multimask_output=False)
    return upsample(low[:, 0, 0])


def upsample(logits: torch.Tensor) -> torch.Tensor:
    """[B, h, w] SAM's low-resolution mask logits -> [B, 84, 84] (bilinear, as SAM's post-processing)."""
    return F.interpolate(logits[:, None], size=(C.SIZE, C.SIZE), mode="bilinear", align_corners=False)[:, 0]


def _points(targets: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """[B, 2] one pixel (x, y) drawn uniformly on each target."""
    points = []
    for t in targets:
        ys, xs = t.nonzero(as_tuple=True)
        i = int(rng.integers(len(ys)))
        points.append([float(xs[i]), float(ys[i])])
    return torch.tensor(points)


def _point_tokens(sam, points: torch.Tensor) -> torch.Tensor:
    """[B, C] SAM's prompt-encoder embedding of the pixels ``points`` [B, 2] (label 1), the point token alone
    (without the padding point SAM adds)."""
    sparse, _ = sam.prompt_encoder(input_points=points[:, None, None, :],
                                   input_labels=torch.ones(len(points), 1, 1, dtype=torch.long), input_boxes=None,
                                   input_masks=None)
    return sparse[:, 0, 0]


def _discs(points: torch.Tensor, radius: float) -> torch.Tensor:
    """[B, 84, 84] discs of ``radius`` pixels around ``points`` [B, 2] (x, y)."""
    yy, xx = torch.meshgrid(torch.arange(C.SIZE), torch.arange(C.SIZE), indexing="ij")
    return (xx - points[:, 0, None, None]) ** 2 + (yy - points[:, 1, None, None]) ** 2 <= radius ** 2


def _schedule(opt, step: int, steps: int, peak: float, warmup: float):
    for group in opt.param_groups:
        group["lr"] = warmup_cosine(step / steps, peak * group.get("scale", 1.0), warmup)


def pretrain_sam(sam, recipe: Recipe, pool: Queries, log=print) -> list[float]:
    """Stage A: SAM learns to segment the garment under one point prompt (:func:`_point_tokens`); the loss per
    step. The first ``recipe.sam_discs`` of the steps ask for a disc around the point instead: without them SAM
    settled on the garments' union whatever the point (on the segmentation canvases: gIoU 0.40 with a point and
    without one after 800 and 2,000 steps), a minimum it did not leave; with them it learns to use the point first."""
    sam.train()
    opt = torch.optim.AdamW(sam.parameters(), lr=recipe.sam_lr, weight_decay=0.01)
    rng, losses = np.random.default_rng([recipe.seed, 10]), []
    for step in range(recipe.sam_steps):
        _schedule(opt, step, recipe.sam_steps, recipe.sam_lr, recipe.warmup)
        q = pool.take(torch.from_numpy(rng.choice(len(pool), recipe.sam_batch, replace=False)))
        points = _points(q.targets, rng)
        target = _discs(points, DISC) if step < recipe.sam_discs * recipe.sam_steps else q.targets
        logits = _decode(sam, sam.get_image_embeddings(sam_pixels(q.images)), _point_tokens(sam, points))
        loss = mask_loss(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == recipe.sam_steps - 1:
            log(f"SAM step {step}: loss {np.mean(losses[-100:]):.3f}")
    sam.eval()
    return losses


def _centroids(targets: torch.Tensor) -> torch.Tensor:
    """[B, 2] the mean pixel (x, y) of each target."""
    ys, xs = torch.meshgrid(torch.arange(C.SIZE), torch.arange(C.SIZE), indexing="ij")
    t = targets.float()
    area = t.sum((1, 2)).clamp(min=1)
    return torch.stack([(t * xs).sum((1, 2)) / area, (t * ys).sum((1, 2)) / area], -1)


def train_lisa(model, recipe: Recipe, pool: Queries, log=print) -> list[float]:
    """Stage B: SAM frozen; the VLM and ``text_hidden_fcs`` learn from :func:`mask_loss` (the tower at a tenth of
    the learning rate), plus ``recipe.point_weight`` times the squared distance of SAM's prompt (the projected
    ``[SEG]`` state) to SAM's point embedding of the target's centroid, plus ``recipe.cell_weight`` times the
    cross-entropy of a linear probe (trained alongside, not shipped) naming the target's grid cell from the ``[SEG]``
    state; the loss per step."""
    for p in model.sam.parameters():
        p.requires_grad_(False)
    model.vlm.train()
    tower = [p for n, p in model.vlm.named_parameters() if "vision_tower" in n]
    probe = torch.nn.Linear(model.vlm.config.get_text_config().hidden_size, C.GRID * C.GRID)  # not shipped
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "vision_tower" not in n]
    rest += list(probe.parameters()) if recipe.cell_weight else []
    opt = torch.optim.AdamW([{"params": rest}, {"params": tower, "scale": 0.1}], lr=recipe.lr, weight_decay=0.01)
    rng, losses, tok = np.random.default_rng([recipe.seed, 11]), [], tokenizer()
    for step in range(recipe.steps):
        _schedule(opt, step, recipe.steps, recipe.lr, recipe.warmup)
        q = pool.take(torch.from_numpy(rng.choice(len(pool), recipe.batch, replace=False)))
        x = batch(q, tok)
        with torch.no_grad():
            embeddings = model.sam.get_image_embeddings(x.pop("sam_pixel_values"))
        out = model(**x, image_embeddings=embeddings, logits_to_keep=1)
        loss = mask_loss(upsample(torch.cat(out.masks)), q.targets)
        if recipe.point_weight:
            prompt = model.text_hidden_fcs(torch.cat(out.seg_states))
            with torch.no_grad():
                point = _point_tokens(model.sam, _centroids(q.targets))
            loss = loss + recipe.point_weight * F.mse_loss(prompt, point)
        if recipe.cell_weight:
            loss = loss + recipe.cell_weight * F.cross_entropy(probe(torch.cat(out.seg_states)), q.cells)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rest + tower, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"LISA step {step}: loss {np.mean(losses[-50:]):.3f}")
    model.eval()
    return losses


# -- evaluation -----------------------------------------------------------------------------------------------------
class Scores(NamedTuple):
    """gIoU (and its standard error over the queries), cIoU, the image tokens per language-model layer averaged over
    the layers (a share of the dense 144), and the number of queries."""

    giou: float
    giou_se: float
    ciou: float
    visual: float
    n: int


@torch.no_grad()
def evaluate(model, q: Queries, method=None, *, batch_size: int = 32) -> Scores:
    """gIoU and cIoU of ``model`` on the queries ``q`` with ``method`` installed on its VLM (``None``: dense)."""
    from prunelab.reproductions.vlm_tiny import mean_visual

    layers = model.vlm.config.get_text_config().num_hidden_layers
    overlaps, shares = [], []
    for i in range(0, len(q), batch_size):
        part = q.take(slice(i, i + batch_size))
        x = batch(part)
        x["image_embeddings"] = model.sam.get_image_embeddings(x.pop("sam_pixel_values"))
        if method is None:
            pred = upsample(torch.cat(model(**x, logits_to_keep=1).masks)) > 0
            shares.append(1.0)
        else:
            with prunelab.apply(model.vlm, method) as h:
                pred = upsample(torch.cat(model(**x, logits_to_keep=1).masks)) > 0
                shares.append(mean_visual(h, layers) / (vlm.TOKENS * len(part)))
        overlaps.append(_overlap(pred, part.targets))
    iou, ciou = _ious(overlaps)
    se = float(iou.std() / len(iou) ** 0.5) if len(iou) > 1 else 0.0
    return Scores(float(iou.mean()), se, ciou, float(np.mean(shares)), len(q))


def _overlap(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, 2] per sample the pixels of intersection and of union of the masks ``pred`` and ``target``."""
    return torch.stack([(pred & target).flatten(1).sum(-1), (pred | target).flatten(1).sum(-1)], -1).float()


def _ious(overlaps: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(per-sample IoU [N], cIoU) from batches of :func:`_overlap`: a sample with an empty union counts 0."""
    inter, union = torch.cat(overlaps).unbind(-1)
    return inter / union.clamp(min=1), float(inter.sum() / union.sum())


@torch.no_grad()
def centroid_oracle(model, q: Queries, *, batch_size: int = 64) -> tuple[float, float]:
    """(gIoU, cIoU) of the frozen SAM prompted with the point embedding of each target's centroid: what a
    ``[SEG]`` state that found the garment exactly would get (the ceiling of stage B's route)."""
    overlaps = []
    for i in range(0, len(q), batch_size):
        part = q.take(slice(i, i + batch_size))
        emb = model.sam.get_image_embeddings(sam_pixels(part.images))
        pred = _decode(model.sam, emb, _point_tokens(model.sam, _centroids(part.targets))) > 0
        overlaps.append(_overlap(pred, part.targets))
    iou, ciou = _ious(overlaps)
    return float(iou.mean()), ciou


def held_out(model, n: int = 500, seed: int = 0) -> dict:
    """Dense scores on ``n`` held-out queries; with the language model's image tokens removed (one
    random token kept: ``text_only``, the check that they matter); and SAM at the targets' centroids
    (``centroid_oracle``)."""
    from prunelab.methods.baselines import RandomPrune

    q = queries("test", n, seed)
    out = {"all": evaluate(model, q)._asdict(),
           "text_only": evaluate(model, q, RandomPrune(budget=1))._asdict(),
           "centroid_oracle": dict(zip(("giou", "ciou"), centroid_oracle(model, q)))}
    return out


def main(argv: list[str] | None = None) -> dict:
    """Train both stages, measure the test-bed on held-out queries, write it."""
    parser = argparse.ArgumentParser(prog=COMMAND, description="Train the tiny-LISA test-bed and write its weights.")
    parser.add_argument("--sam-steps", type=int, default=Recipe.sam_steps)
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--pool", type=int, default=Recipe.pool, help="training composites")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it in the last bits)")
    parser.add_argument("--n-eval", type=int, default=500, help="held-out queries")
    parser.add_argument("--point-weight", type=float, default=Recipe.point_weight,
                        help="weight of stage B's squared distance to the centroid's point embedding (0: masks only)")
    parser.add_argument("--cell-weight", type=float, default=Recipe.cell_weight,
                        help="weight of stage B's cross-entropy of the target's cell from the [SEG] state")
    parser.add_argument("--lr", type=float, default=Recipe.lr, help="stage B's peak learning rate")
    parser.add_argument("--seed", type=int, default=Recipe.seed, help="seed of the pool's classes and the batches")
    parser.add_argument("--init", default=None, help="continue from these test-bed weights (with --sam-steps 0: "
                                                     "stage B only) instead of starting from the VLM test-bed")
    parser.add_argument("--out", default=str(WEIGHTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(sam_steps=args.sam_steps, steps=args.steps, pool=args.pool, seed=args.seed,
                    point_weight=args.point_weight, cell_weight=args.cell_weight, lr=args.lr)
    t0 = time.perf_counter()
    pool = queries("train", recipe.pool, recipe.seed)
    if args.init:
        model, _ = load(args.init, check=False)
        init = {"path": Path(args.init).name, "sha256": sha256(args.init),
                "info": json.loads(shipped.metadata(args.init, WEIGHTS, SHA256, COMMAND, check=False)[1]["info"])}
    else:
        model, init = from_vlm(recipe.seed)[0], "the VLM test-bed's shipped weights"
    t1 = time.perf_counter()
    sam_losses = pretrain_sam(model.sam, recipe, pool)
    t2 = time.perf_counter()
    losses = train_lisa(model, recipe, pool)
    t3 = time.perf_counter()
    info = {"recipe": dataclasses.asdict(recipe), "init": init, "data_seconds": t1 - t0, "sam_seconds": t2 - t1,
            "lisa_seconds": t3 - t2, "sam_loss_last100": float(np.mean(sam_losses[-100:])) if sam_losses else None,
            "loss_last50": float(np.mean(losses[-50:])) if losses else None, "threads": args.threads}
    info["held_out"] = held_out(model, n=args.n_eval)
    digest = save(model, info, args.out)
    print(json.dumps(info["held_out"], indent=1))
    print(f"trained in {t3 - t0:.0f} s (data {t1 - t0:.0f} s, SAM {t2 - t1:.0f} s, LISA {t3 - t2:.0f} s); wrote "
          f"{args.out}\nsha256 {digest}", flush=True)
    return info


if __name__ == "__main__":
    main()
