"""LongBench-V1 (Bai et al., 2023) data, prompts, truncation and metrics, written for this repository.

Data: the official release's ``data/<task>.jsonl`` files (fields ``context``, ``input``, ``answers``,
``all_classes``), from a local folder. Scores follow the benchmark's metric families, in our own code:
token F1 for QA, ROUGE-L for summaries, exact class match for classification, paragraph-id match for
retrieval, count match, and an edit similarity for code. Chinese tasks score characters instead of words.

Prompts: the benchmark ships one template per task. We do not redistribute them; pass the official
``dataset2prompt.json`` / ``dataset2maxlen.json`` with ``--prompts`` / ``--max-new-tokens`` for numbers comparable
with the paper. Without them a neutral template and 128 new tokens are used, and the table says so.
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections import Counter
from pathlib import Path

METRIC = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_zh", "gov_report": "rouge",
    "qmsum": "rouge", "multi_news": "rouge", "vcsum": "rouge_zh", "trec": "classification", "triviaqa": "qa_f1",
    "samsum": "rouge", "lsht": "classification", "passage_count": "count", "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval", "lcc": "code_sim", "repobench-p": "code_sim",
}
GENERIC_PROMPT = "{context}\n\nAnswer the question based on the text above.\nQuestion: {input}\nAnswer:"


def load_task(folder: str | Path, task: str, limit: int | None = None) -> list[dict]:
    path = Path(folder) / f"{task}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"longbench: {path} not found; download LongBench-V1's data/*.jsonl into {folder}")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def build_prompt(sample: dict, template: str) -> str:
    return template.format(context=sample.get("context", ""), input=sample.get("input", ""))


def truncate_middle(ids: list[int], max_length: int) -> list[int]:
    """Keep the first and last ``max_length / 2`` tokens (the benchmark's middle truncation)."""
    if len(ids) <= max_length:
        return ids
    half = max_length // 2
    return ids[:half] + ids[len(ids) - (max_length - half):]


def _normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(pred: list[str], gold: list[str]) -> float:
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(gold)
    return 2 * p * r / (p + r)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_l(pred: list[str], gold: list[str]) -> float:
    if not pred or not gold:
        return 0.0
    lcs = _lcs(pred, gold)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(gold)
    return 2 * p * r / (p + r)


def _chars(text: str) -> list[str]:
    return [c for c in text if not c.isspace() and c not in string.punctuation]


def score_one(metric: str, prediction: str, answer: str, all_classes: list[str] | None = None) -> float:
    """One prediction against one reference answer, in [0, 1]."""
    if metric == "qa_f1":
        return _f1(_normalize(prediction).split(), _normalize(answer).split())
    if metric == "qa_f1_zh":
        return _f1(_chars(prediction), _chars(answer))
    if metric == "rouge":
        return _rouge_l(prediction.lower().split(), answer.lower().split())
    if metric == "rouge_zh":
        return _rouge_l(_chars(prediction), _chars(answer))
    if metric == "classification":
        hits = [c for c in (all_classes or []) if c in prediction]
        return float(answer in hits) / len(hits) if hits else 0.0
    if metric == "retrieval":
        want = re.findall(r"\d+", answer)
        got = re.findall(r"\d+", prediction)
        return sum(g == want[0] for g in got) / len(got) if got and want else 0.0
    if metric == "count":
        got = re.findall(r"\d+", prediction)
        return sum(g == answer.strip() for g in got) / len(got) if got else 0.0
    if metric == "code_sim":
        lines = [ln for ln in prediction.lstrip("\n").split("\n") if not ln.strip().startswith(("#", "//", "`"))]
        return difflib.SequenceMatcher(None, lines[0] if lines else "", answer).ratio()
    raise ValueError(f"metric: unknown {metric!r}")


def score(task: str, predictions: list[str], samples: list[dict]) -> float:
    """The task score in percent: the best match over each sample's answers, averaged."""
    metric = METRIC[task]
    if not samples:
        raise ValueError(f"samples: no samples for {task}")
    total = 0.0
    for pred, s in zip(predictions, samples):
        if metric in ("qa_f1", "qa_f1_zh") and task in ("trec", "triviaqa", "samsum", "lsht"):
            pred = pred.lstrip("\n").split("\n")[0]
        total += max(score_one(metric, pred, a, s.get("all_classes")) for a in s["answers"])
    return 100.0 * total / len(samples)
