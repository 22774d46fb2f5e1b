"""LVLM_CSP's full preset (``reproductions/lvlm_csp/{full,data}.py``) and LISA's prompts
(``methods/lvlm_csp/lisa_prompt.py``): the readers, masks and metrics on hand-made inputs, and the preset end to end
on a tiny LISA checkpoint folder with tiny ReasonSeg and RefCOCO folders written here."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lisa_helpers import SEG, segmenter, write_lisa
from PIL import Image

from prunelab.cli import main as cli
from prunelab.methods.lvlm_csp.lisa_prompt import LLAVA_V1_SYSTEM, lisa_conversation, lisa_input_ids
from prunelab.reproductions.lvlm_csp import data


def _rle_string(counts: list[int]) -> str:
    """COCO's compressed RLE string of run lengths (``maskApi.c``'s ``rleToString``)."""
    out = []
    for i, x in enumerate(counts):
        x = x - counts[i - 2] if i > 2 else x
        more = True
        while more:
            c, x = x & 0x1F, x >> 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def _runs(mask: np.ndarray) -> list[int]:
    flat = mask.T.flatten()  # column-major
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = [0, *edges.tolist(), flat.size]
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] == 1 else runs


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for h, w in ((5, 7), (13, 4)):
        mask = (rng.random((h, w)) < 0.4).astype(np.uint8)
        mask[0, 0] = 1  # a mask starting with a foreground pixel: a zero-length first run
        runs = _runs(mask)
        assert data.rle_counts(_rle_string(runs)) == runs
        np.testing.assert_array_equal(data.rle_decode({"size": [h, w], "counts": _rle_string(runs)}), mask)
        np.testing.assert_array_equal(data.rle_decode({"size": [h, w], "counts": runs}), mask)
    with pytest.raises(ValueError, match="segmentation"):
        data.rle_decode({"size": [2, 2], "counts": [1, 2]})


# pycocotools 2.0.8's masks of two polygons (``mask.decode(mask.frPyObjects([poly], 7, 8))``), rows of pixels
COCO_MASKS = {
    (1, 1, 6, 1, 6, 4, 1, 4): ("00000000", "01111100", "01111100", "01111100", "00000000", "00000000", "00000000"),
    (0.5, 0.2, 6.7, 2.9, 3.1, 6.4): ("00000000", "01110000", "00111100", "00111100", "00111000", "00010000",
                                     "00000000"),
}


@pytest.mark.parametrize("poly", list(COCO_MASKS))
def test_coco_polygon_matches_pycocotools(poly):
    want = np.array([[int(c) for c in row] for row in COCO_MASKS[poly]], np.uint8)
    np.testing.assert_array_equal(data.coco_polygon(list(poly), 7, 8), want)
    shifted = data.coco_polygon([v + 1 for v in poly], 8, 9)  # the same shape one pixel down and right
    np.testing.assert_array_equal(shifted[1:, 1:], want)


def _write_reasonseg(folder, rng):
    folder.mkdir()
    shapes = [{"label": "ignore", "points": [[4, 4], [7, 4], [7, 7], [4, 7]], "shape_type": "polygon"},
              {"label": "target", "points": [[2, 3], [14, 3], [14, 12], [2, 12]], "shape_type": "polygon"},
              {"label": "flag", "points": [[0, 0], [20, 0], [20, 20], [0, 20]], "shape_type": "polygon"}]
    for i, (w, h, sentence) in enumerate(((24, 18, True), (20, 28, False), (30, 30, True))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.jpg")
        text = ["the thing one would sit on.", "unused second query"] if sentence else ["the red block"]
        (folder / f"p{i}.json").write_text(json.dumps({"text": text, "is_sentence": sentence, "shapes": shapes}))


def test_reasonseg_reader(tmp_path):
    _write_reasonseg(tmp_path / "val", np.random.default_rng(0))
    samples = list(data.reasonseg(tmp_path / "val"))
    assert [s.name for s in samples] == ["p0", "p1", "p2"]
    s = samples[0]
    assert s.queries == [("the thing one would sit on.", True)]  # the first query only, as LISA evaluates
    assert s.masks.shape == (1, 18, 24)
    m = s.masks[0]
    assert (m[4:8, 4:8] == data.IGNORE).all()  # the small ignore drawn after the larger target
    assert m[3, 2] == 1 and m[12, 14] == 1 and m[13, 14] == 0 and m[3, 15] == 0  # edges included, flag skipped
    assert int((m == 1).sum()) == 13 * 10 - 16
    assert samples[1].queries == [("the red block", False)]
    assert data.question("the red block", False) == "What is the red block in this image? Please output " \
                                                    "segmentation mask."
    assert data.question(" why? ", True) == "why? Please output segmentation mask."
    with pytest.raises(FileNotFoundError, match="data"):
        list(data.reasonseg(tmp_path))


def _write_refer(root, rng):
    (root / "refcoco").mkdir(parents=True)
    pics = root / "images/mscoco/images/train2014"
    pics.mkdir(parents=True)
    images, anns, refs = [], [], []
    blob = np.zeros((20, 16), np.uint8)
    blob[5:9, 3:12] = 1
    for image_id, (w, h) in ((7, (16, 20)), (3, (22, 14))):
        name = f"COCO_train2014_{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(pics / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    anns.append({"id": 70, "image_id": 7, "segmentation": {"size": [20, 16], "counts": _rle_string(_runs(blob))}})
    anns.append({"id": 71, "image_id": 7, "segmentation": [[1, 1, 6, 1, 6, 4, 1, 4], [8, 10, 12, 10, 12, 15]]})
    anns.append({"id": 30, "image_id": 3, "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]})
    refs.append({"ref_id": 1, "ann_id": 70, "image_id": 7, "split": "val",
                 "sentences": [{"sent": " The Left One "}, {"sent": "blob"}]})
    refs.append({"ref_id": 2, "ann_id": 71, "image_id": 7, "split": "val", "sentences": [{"sent": "two parts"}]})
    refs.append({"ref_id": 3, "ann_id": 30, "image_id": 3, "split": "val", "sentences": [{"sent": "corner"}]})
    refs.append({"ref_id": 4, "ann_id": 30, "image_id": 3, "split": "testA", "sentences": [{"sent": "elsewhere"}]})
    (root / "refcoco/instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
    with (root / "refcoco/refs(unc).p").open("wb") as f:
        pickle.dump(refs, f)
    return blob


def test_refer_reader(tmp_path):
    blob = _write_refer(tmp_path, np.random.default_rng(1))
    samples = list(data.refer(tmp_path, "refcoco", "val"))
    assert [s.name for s in samples] == ["3", "7"]  # sorted image ids
    s3, s7 = samples
    assert s3.queries == [("corner", False)]
    assert s7.queries == [("the left one", False), ("blob", False), ("two parts", False)]
    np.testing.assert_array_equal(s7.masks[0], blob)
    np.testing.assert_array_equal(s7.masks[1], blob)
    parts = [data.coco_polygon(p, 20, 16) for p in ([1, 1, 6, 1, 6, 4, 1, 4], [8, 10, 12, 10, 12, 15])]
    np.testing.assert_array_equal(s7.masks[2], parts[0] + parts[1])  # several polygons: their sum
    assert s7.masks[2][1:4, 1:6].all() and int(parts[0].sum()) == 15 and parts[1].sum() > 0
    assert int(s3.masks[0].sum()) == 25  # COCO's rasteriser: [0, 5) x [0, 5)
    assert [s.name for s in data.refer(tmp_path, "refcoco", "testA")] == ["3"]
    with pytest.raises(ValueError, match="split"):
        list(data.refer(tmp_path, "refcoco", "testB"))
    with pytest.raises(FileNotFoundError, match="data"):
        list(data.refer(tmp_path, "refcocog", "val"))
    with pytest.raises(ValueError, match="dataset"):
        list(data.refer(tmp_path, "refclef", "val"))


def test_ious_and_scores():
    target = np.array([[1, 1, 0, data.IGNORE]], np.uint8)
    pred = np.array([[True, False, True, True]])
    assert data.ious(pred, target) == (1, 3)  # the ignored pixel counts in neither
    assert data.ious(np.zeros((1, 4), bool), np.zeros((1, 4), np.uint8)) == (0, 0)
    s = data.scores([(1, 3), (0, 0), (2, 2)])
    assert s["n"] == 3 and s["giou"] == pytest.approx((1 / 3 + 1 + 1) / 3, abs=1e-4)  # empty union counts 1
    assert s["ciou"] == pytest.approx(3 / 5)


class _Tok:
    """A tokenizer of word lengths, with an optional BOS (id 1)."""

    def __init__(self, bos):
        self.bos_token_id, self.pad_token_id, self.unk_token_id = (1 if bos else None), None, 0

    def __call__(self, text):
        return SimpleNamespace(input_ids=([1] if self.bos_token_id else []) + [len(w) + 10 for w in text.split()])


@pytest.mark.parametrize("bos", [True, False])
def test_lisa_input_ids(bos):
    prompts = [lisa_conversation("a b?", im_start_end=False), "x <image> yy zzz"]
    assert prompts[0] == f"{LLAVA_V1_SYSTEM} USER: <image>\n a b? ASSISTANT: [SEG].</s>"
    assert lisa_conversation("q").count("<im_start><image><im_end>") == 1
    ids, mask = lisa_input_ids(_Tok(bos), prompts, 99, 3)
    lead = [1] if bos else []
    row1 = lead + [11, 99, 99, 99, 12, 13]
    assert ids[1, :len(row1)].tolist() == row1
    assert mask[1].tolist() == [1] * len(row1) + [0] * (ids.shape[1] - len(row1))  # right padding, as LISA pads
    assert (ids[0] == 99).sum() == 3 and ids[0, 0].item() == (1 if bos else len("A") + 10)
    assert int(mask[0].sum()) == ids.shape[1]  # the longer prompt: no padding
    with pytest.raises(ValueError, match="prompts"):
        lisa_input_ids(_Tok(bos), ["no image"], 99, 3)


def _checkpoint(tmp_path):
    """A tiny LISA checkpoint folder (with a word-level tokenizer holding [SEG] at SEG), its CLIP folder with an
    image processor, and SAM's config."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import CLIPImageProcessor, PreTrainedTokenizerFast

    model = segmenter(False)
    lisa_dir, clip_dir = write_lisa(tmp_path, model, linear=False, tower_inside=False)
    words = ["<unk>", "<pad>", "</s>", *"a chat between curious human and an artificial intelligence assistant the "
             "gives helpful detailed polite answers to human's questions user what is in this image please output "
             "segmentation mask".split(), ".", ":", "?", ","]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    vocab.update({"[SEG]": SEG, "<im_start>": SEG + 1, "<im_end>": SEG + 2})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ("[SEG]", "<im_start>", "<im_end>", "</s>", "<pad>")])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(lisa_dir)
    config = json.loads((lisa_dir / "config.json").read_text())
    (lisa_dir / "config.json").write_text(json.dumps({**config, "mm_use_im_start_end": True}))
    size = model.vlm.config.vision_config.image_size
    clip = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    clip.save_pretrained(clip_dir)
    model.sam.config.to_json_file(tmp_path / "sam.json")
    return lisa_dir, clip_dir, tmp_path / "sam.json"


def _rows(out):
    return json.loads((out / "full.json").read_text())["rows"]


@torch.no_grad()
def test_full_preset_end_to_end(tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessor, SamConfig, SamImageProcessor

    from prunelab.methods.lvlm_csp.lisa_checkpoint import load_lisa

    lisa_dir, clip_dir, sam_json = _checkpoint(tmp_path)
    rng = np.random.default_rng(2)
    _write_reasonseg(tmp_path / "val", rng)
    _write_refer(tmp_path / "refer", rng)
    common = ["reproduce", "lvlm_csp", "--preset", "full", "--model", str(lisa_dir), "--vision-tower", str(clip_dir),
              "--sam-config", str(sam_json), "--settings", "16,16,1,2", "4,4,1,2"]
    assert cli([*common, "--data", str(tmp_path / "val"), "--out", str(tmp_path / "rs")]) == 0
    assert cli([*common, "--dataset", "refcoco", "--data", str(tmp_path / "refer"), "--out",
                str(tmp_path / "rc")]) == 0
    for out, queries in ((tmp_path / "rs", 3), (tmp_path / "rc", 4)):
        rows = _rows(out)
        assert (out / "full.md").is_file() and (out / "full.png").is_file()
        assert [r["method"] for r in rows] == ["dense", "LVLM_CSP", "[SEG] one-stage", "random", "LVLM_CSP",
                                               "[SEG] one-stage", "random"]
        assert all(r["n"] == queries for r in rows)
        dense, keep_all = rows[0], rows[1:4]
        for r in keep_all:  # every token kept: the dense masks exactly
            assert (r["giou"], r["ciou"], r["visual_%"]) == (dense["giou"], dense["ciou"], 100.0)
        csp = rows[4]
        assert csp["visual_%"] == pytest.approx(100 * (4 + 16 + 4) / 3 / 16)
        assert rows[5]["visual_%"] == pytest.approx(100 * (16 + 2 * 4) / 3 / 16)  # one-stage: keep 4 from layer 1
    # the dense row against one query at a time, unpadded, straight through LisaSegmenter
    ckpt = load_lisa(lisa_dir, vision_tower=clip_dir, sam_config=SamConfig.from_json_file(str(sam_json)))
    tok, clip = AutoTokenizer.from_pretrained(str(lisa_dir)), CLIPImageProcessor.from_pretrained(str(clip_dir))
    sam = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    overlaps = []
    for s in data.refer(tmp_path / "refer", "refcoco", "val"):
        sam_in = sam(images=np.asarray(s.image), return_tensors="pt")
        for (text, sentence), target in zip(s.queries, s.masks):
            ids, mask = lisa_input_ids(tok, [lisa_conversation(data.question(text, sentence))], ckpt.image_token_id, 16)
            low = ckpt.model(input_ids=ids, attention_mask=mask, pixel_values=clip(images=s.image, return_tensors="pt")
                             ["pixel_values"], sam_pixel_values=sam_in["pixel_values"]).masks[0]
            pred = sam.post_process_masks([low[:, None]], sam_in["original_sizes"], sam_in["reshaped_input_sizes"])
            overlaps.append(data.ious(pred[0][0, 0].numpy(), target))
    want = data.scores(overlaps)
    dense = _rows(tmp_path / "rc")[0]
    assert 0 < want["ciou"] and dense["giou"] == pytest.approx(want["giou"], abs=1e-6)
    assert dense["ciou"] == pytest.approx(want["ciou"], abs=1e-6)


def test_full_preset_errors(tmp_path):
    lisa_dir, clip_dir, sam_json = _checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    base = ["reproduce", "lvlm_csp", "--preset", "full", "--model", str(lisa_dir), "--sam-config", str(sam_json)]
    with pytest.raises(ValueError, match="prune_layer"):  # the default settings (L2 = 16) on a 3-layer model
        cli([*base, "--vision-tower", str(clip_dir), "--data", str(tmp_path / "empty")])
    base += ["--settings", "4,4,1,2"]
    with pytest.raises(FileNotFoundError, match="data"):
        cli([*base, "--vision-tower", str(clip_dir), "--data", str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="vision_tower"):  # no image processor anywhere
        (clip_dir / "preprocessor_config.json").unlink(missing_ok=True)
        cli([*base, "--vision-tower", str(clip_dir), "--data", str(tmp_path / "empty")])
    with pytest.raises(SystemExit):
        cli([*base, "--data", str(tmp_path / "empty"), "--settings", "4,4,2,2"])  # L1 must be below L2
