"""ReasonSeg and RefCOCO(+/g) from local folders, as LISA's evaluation reads them, and LISA's gIoU / cIoU.

Both readers give :class:`Sample` objects: one picture, its queries (each a text and whether it is a sentence) and one
ground-truth mask per query, uint8 over the picture with 1 for the target, 0 for the background and 255 for pixels
the metric ignores. They follow ``ValDataset`` of LISA (``utils/dataset.py`` and ``utils/data_processing.py``):

- **ReasonSeg** (``reasonseg(folder)``): the split folder (``ReasonSeg/val``) of ``*.jpg`` pictures, each with a
  ``.json`` beside it: ``text`` (a list of queries), ``is_sentence``, and ``shapes`` (polygons labelled ``target``, or
  ``ignore`` for pixels left out of the metric; ``flag`` shapes are skipped). The polygons are drawn largest first, so
  a small ``ignore`` inside a target stays ignored. Only each picture's first query is evaluated, as LISA does.
- **RefCOCO, RefCOCO+, RefCOCOg** (``refer(root, dataset, split)``): LISA's ``refer_seg`` layout: ``root/<dataset>/
  refs(<split_by>).p`` (``unc`` for RefCOCO and RefCOCO+, ``umd`` for RefCOCOg), ``root/<dataset>/instances.json``
  (COCO annotations: polygons or run-length encodings) and the pictures under ``root/images/mscoco/images/
  train2014``. Every sentence of every referring expression of the split is a query (stripped, lower case), its mask
  the expression's annotation; a mask made of several polygons is their pixel-wise sum, as LISA sums them.

RefCOCO's polygons are drawn by :func:`coco_polygon`, COCO's own rasteriser (pycocotools' ``rleFrPoly``, which LISA
calls) rewritten in NumPy; it matched pycocotools 2.0.8 pixel for pixel on random polygons. ReasonSeg's are drawn
with Pillow, edges included; LISA draws them with OpenCV's ``fillPoly`` and a 1 px outline, which includes the edges
too, but the two can differ on boundary pixels of slanted edges. Neither OpenCV nor pycocotools is a dependency
here. Pictures are read in sorted order (LISA's follow ``glob`` and set order).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["IGNORE", "REFER_SPLIT_BY", "Sample", "coco_polygon", "ious", "question", "reasonseg", "refer", "rle_counts",
           "rle_decode", "scores"]

IGNORE = 255
REFER_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


@dataclass
class Sample:
    """A picture (RGB), its queries ``(text, is_sentence)`` and their masks ``[n, H, W]`` (uint8: 1 target,
    :data:`IGNORE` ignored)."""

    name: str
    image: Image.Image
    queries: list[tuple[str, bool]]
    masks: np.ndarray


def question(text: str, is_sentence: bool) -> str:
    """LISA's evaluation question of a query: a sentence as it is, a phrase inside "What is ... in this image?"."""
    text = text.strip()
    if is_sentence:
        return f"{text} Please output segmentation mask."
    return f"What is {text} in this image? Please output segmentation mask."


def _polygon(points, shape: tuple[int, int], value: int, out: np.ndarray | None = None) -> np.ndarray:
    """``points`` ([[x, y], ...] or a flat [x0, y0, x1, y1, ...]) filled with ``value``, edges included, into ``out``
    (a new zero mask of ``shape`` when ``None``); coordinates truncated to integers, as OpenCV's int32 cast does."""
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2).astype(np.int32)
    canvas = Image.fromarray(np.zeros(shape, np.uint8) if out is None else out)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in xy.tolist()], fill=value, outline=value)
    return np.array(canvas)


def _reasonseg_mask(shapes: list[dict], size: tuple[int, int]) -> np.ndarray:
    kept = [s for s in shapes if s["label"].lower() != "flag"]
    areas = [int(_polygon(s["points"], size, 1).sum()) for s in kept]
    mask = np.zeros(size, np.uint8)
    for i in np.argsort(areas, kind="stable")[::-1]:  # largest first
        value = IGNORE if "ignore" in kept[i]["label"].lower() else 1
        mask = _polygon(kept[i]["points"], size, value, mask)
    return mask


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:  # some ReasonSeg files are cp1252, as LISA's reader allows
        return json.loads(path.read_text(encoding="cp1252"))


def reasonseg(folder: str | Path, limit: int | None = None) -> Iterator[Sample]:
    """The ReasonSeg split in ``folder`` (``*.jpg`` with their ``.json``), first query of each picture."""
    folder = Path(folder)
    pictures = sorted(folder.glob("*.jpg"))
    if not pictures:
        raise FileNotFoundError(f"data: no *.jpg in {folder} (a ReasonSeg split folder, e.g. ReasonSeg/val)")
    for path in pictures[:limit]:
        note = path.with_suffix(".json")
        if not note.is_file():
            raise FileNotFoundError(f"data: {path.name} has no {note.name} beside it")
        anno = _read_json(note)
        image = Image.open(path).convert("RGB")
        mask = _reasonseg_mask(anno["shapes"], (image.height, image.width))
        yield Sample(path.stem, image, [(anno["text"][0], bool(anno["is_sentence"]))], mask[None])


def rle_counts(counts: str | bytes) -> list[int]:
    """The run lengths of COCO's compressed RLE string (``maskApi.c``'s ``rleFrString``)."""
    s = counts.decode() if isinstance(counts, bytes) else counts
    out, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        out.append(x + out[-2] if len(out) > 2 else x)
    return out


def rle_decode(rle: dict) -> np.ndarray:
    """A COCO run-length encoding (``size`` [h, w], ``counts`` a list or a compressed string) as a uint8 mask."""
    h, w = rle["size"]
    counts = rle["counts"] if isinstance(rle["counts"], list) else rle_counts(rle["counts"])
    values = np.arange(len(counts)) % 2  # runs alternate 0, 1, 0, ... in column-major order
    flat = np.repeat(values.astype(np.uint8), counts)
    if flat.size != h * w:
        raise ValueError(f"segmentation: run lengths cover {flat.size} pixels, the mask has {h * w}")
    return flat.reshape(w, h).T.copy()


def _edge_points(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer points along every edge of the closed polygon ``(x, y)`` (on the 5x grid), one per step of the
    edge's longer axis, each edge walked from its lower end on that axis."""
    us, vs = [], []
    for xs, xe, ys, ye in zip(x[:-1], x[1:], y[:-1], y[1:]):
        dx, dy = abs(xe - xs), abs(ye - ys)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        steps = max(dx, dy)
        t = np.arange(steps + 1)
        t = steps - t if flip else t
        slope = ((ye - ys) if dx >= dy else (xe - xs)) / steps if steps else 0.0  # a repeated vertex: one point
        if dx >= dy:
            us.append(t + xs)
            vs.append(np.trunc(ys + slope * t + 0.5).astype(np.int64))
        else:
            vs.append(t + ys)
            us.append(np.trunc(xs + slope * t + 0.5).astype(np.int64))
    return np.concatenate(us), np.concatenate(vs)


def coco_polygon(points, h: int, w: int) -> np.ndarray:
    """The uint8 mask of one COCO polygon (flat ``[x0, y0, x1, y1, ...]``) as COCO's own rasteriser draws it
    (``maskApi.c``'s ``rleFrPoly``, which pycocotools and so LISA use): the boundary walked on a 5x finer grid, a
    pixel column's runs switched where the boundary crosses its centre line."""
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    scale = 5.0
    x = np.trunc(scale * xy[:, 0] + 0.5).astype(np.int64)
    y = np.trunc(scale * xy[:, 1] + 0.5).astype(np.int64)
    u, v = _edge_points(np.append(x, x[0]), np.append(y, y[0]))
    step = np.flatnonzero(u[1:] != u[:-1]) + 1  # points where the walk changes column
    xd = (np.where(u[step] < u[step - 1], u[step], u[step] - 1) + 0.5) / scale - 0.5
    yd = (np.minimum(v[step], v[step - 1]) + 0.5) / scale - 0.5
    ok = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    cols, rows = xd[ok].astype(np.int64), np.ceil(np.clip(yd[ok], 0, h)).astype(np.int64)
    switches = np.sort(np.append(cols * h + rows, h * w))
    runs = np.diff(switches, prepend=0).tolist()
    counts = [runs[0]]
    i = 1
    while i < len(runs):  # a zero-length run merges its neighbours
        if runs[i] > 0:
            counts.append(runs[i])
            i += 1
        else:
            if i + 1 < len(runs):
                counts[-1] += runs[i + 1]
            i += 2
    return rle_decode({"size": [h, w], "counts": counts})


def _annotation_mask(segmentation, h: int, w: int) -> np.ndarray:
    if not segmentation:
        return np.zeros((h, w), np.uint8)
    if isinstance(segmentation, dict):
        return rle_decode(segmentation)
    if isinstance(segmentation[0], dict):  # a list of RLEs
        return sum(rle_decode(r) for r in segmentation).astype(np.uint8)
    return sum(coco_polygon(p, h, w) for p in segmentation).astype(np.uint8)


def refer(root: str | Path, dataset: str, split: str, *, split_by: str | None = None,
          limit: int | None = None) -> Iterator[Sample]:
    """The referring expressions of ``split`` of ``dataset`` (refcoco, refcoco+, refcocog) under ``root``."""
    if dataset not in REFER_SPLIT_BY and split_by is None:
        raise ValueError(f"dataset: expected one of {sorted(REFER_SPLIT_BY)} (or give split_by), got {dataset!r}")
    root = Path(root)
    refs_path = root / dataset / f"refs({split_by or REFER_SPLIT_BY[dataset]}).p"
    if not refs_path.is_file():
        raise FileNotFoundError(f"data: no {refs_path.relative_to(root)} under {root} (LISA's refer_seg layout)")
    with refs_path.open("rb") as f:
        refs = [r for r in pickle.load(f) if r["split"] == split]
    if not refs:
        raise ValueError(f"split: no referring expressions of split {split!r} in {refs_path.name}")
    coco = json.loads((root / dataset / "instances.json").read_text())
    images = {im["id"]: im for im in coco["images"]}
    anns = {a["id"]: a for a in coco["annotations"]}
    by_image: dict[int, list[dict]] = {}
    for r in refs:
        by_image.setdefault(r["image_id"], []).append(r)
    for image_id in sorted(by_image)[:limit]:
        info = images[image_id]
        image = Image.open(root / "images/mscoco/images/train2014" / info["file_name"]).convert("RGB")
        queries, masks = [], []
        for r in by_image[image_id]:
            mask = _annotation_mask(anns[r["ann_id"]]["segmentation"], info["height"], info["width"])
            for sent in r["sentences"]:
                queries.append((sent["sent"].strip().lower(), False))
                masks.append(mask)
        yield Sample(str(image_id), image, queries, np.stack(masks))


def ious(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """(intersection, union) of the foreground of a predicted bool mask and a target mask, pixels of value
    :data:`IGNORE` left out of both (LISA's ``intersectionAndUnionGPU`` with two classes)."""
    kept = pred & (target != IGNORE)
    inter = int((kept & (target == 1)).sum())
    return inter, int(kept.sum()) + int((target == 1).sum()) - inter


def scores(overlaps: list[tuple[int, int]]) -> dict:
    """LISA's gIoU (the mean of per-query IoU, a query with an empty union counting 1) and cIoU (total intersection
    over total union), with the gIoU's standard error and the query count."""
    inter = np.array([o[0] for o in overlaps], np.float64)
    union = np.array([o[1] for o in overlaps], np.float64)
    per = inter / (union + 1e-5) + (union == 0)
    se = float(per.std(ddof=1) / len(per) ** 0.5) if len(per) > 1 else 0.0
    return {"giou": float(per.mean()), "giou_se": se, "ciou": float(inter.sum() / (union.sum() + 1e-10)),
            "n": len(per)}
