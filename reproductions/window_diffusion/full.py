"""``prunelab reproduce window_diffusion --preset full``: LLaDA-8B-Base or Dream-v0-Base-7B on lm-evaluation-harness,
the vanilla sampler against Window-Diffusion (Zuo et al., arXiv 2601.20332).

The model is read from a local folder (``--model-dir``: the hub's ``GSAI-ML/LLaDA-8B-Base`` or
``Dream-org/Dream-v0-Base-7B`` files; the family from its ``config.json`` or ``--family``) through prunelab's own
loaders, no remote code run. Each task runs through lm-eval (the ``eval`` extra) with the model ``prunelab_dlm``
(:mod:`.lm_eval_model`) twice: the vanilla sampler and Window-Diffusion (``--method both``, the default). The
settings are the official evaluation scripts' (vhicrgit/Window-Diffusion at d8bb349, ``llada/scripts`` and
``dream/scripts/run_benchmarks.sh``; the README's "Appendix A.2" table):

- LLaDA-8B-Base: gsm8k 4-shot, answer 256; minerva_math 4-shot, 256; humaneval 0-shot, 512; mbpp 3-shot, 512.
  Window 64, active 16, refresh cycle 32, steps = answer length, temperature 0, no early stop.
- Dream-v0-Base-7B: gsm8k_cot 8-shot, 256; minerva_math 4-shot, 512; humaneval 0-shot, 512 (refresh cycle 40,
  top-p 0.95); mbpp 3-shot, 512. Window 128, active 16, refresh cycle 32, slide_window, temperature 0, top-p 0.99,
  no early stop. prunelab's ``window_tokens`` counts the masks kept; the release's ``o_win_size=128`` keeps 127
  (see the method README); 128 is kept here as the method's default. Dream's vanilla row is Dream's loop as the
  release's full steps run it (:func:`dream_generate`: the leftmost mask each step, every position computed).

``--tasks`` takes lm-eval task names, each optionally ``NAME:SHOTS:ANSWER_LENGTH`` (the table above fills in what is
left out for its tasks; other tasks need the answer length). ``--include-path`` adds a folder of task YAMLs. The
datasets, and for humaneval / mbpp the ``code_eval`` metric of ``evaluate``, come from the Hugging Face hub (or their
caches).

Per task and row the table has the score (the task's metric, in %; lm-eval's stderr beside it), the mean seconds per
sample (wall clock around the sampler, the device synchronised), answer tokens per second (all G decoded positions),
the mean MACs per sample (:func:`~prunelab.methods.window_diffusion.run_macs`), the speed-up and the MACs ratio
against the vanilla row, and the official reference from ``expected.yaml`` for the LLaDA rows at the paper's
settings. Per-sample records (time, tokens, MACs, answer) and lm-eval's own samples are written under ``samples/``.

Code execution: humaneval and mbpp run the model's code against the tasks' tests (lm-eval marks them unsafe). The
preset passes lm-eval's ``confirm_run_unsafe_code``; the consent is yours: export ``HF_ALLOW_CODE_EVAL=1`` (the
``code_eval`` metric refuses without it), preferably inside a sandbox. Without it the preset stops before loading
the model. The release's reported HumanEval / MBPP numbers are after its own post-processing of the answers
(``scripts/postprocess_code.py``, ``scripts/postprocess_mbpp_eval.py``), which is not reimplemented: the scores here
are lm-eval's raw ones, and the ``samples/*_lm_eval.jsonl`` files are what that post-processing reads.

MATH: lm-eval's minerva_math needs its ``math`` extra (``antlr4-python3-runtime==4.11``, ``math-verify`` with
``latex2sympy2_extended``), which prunelab's locked environment cannot hold: lmms-eval 0.7.3's ``latex2sympy2`` pins
``antlr4-python3-runtime==4.7.2``. Run it in an environment with ``pip install "lm-eval[math]==0.4.13"``, or leave it
out (``--tasks gsm8k humaneval mbpp``); the preset says so before loading the model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch
import yaml

from prunelab.cli import POSITIVE, existing
from prunelab.common.provenance import markdown_table, provenance, write_results
from prunelab.common.validate import check_choice
from prunelab.methods.window_diffusion import DiffusionLM, load_dream, load_llada

METHODS = ("vanilla", "window")
FAMILIES = ("llada", "dream")
DTYPES = ("bfloat16", "float16", "float32")
WINDOW_FIELDS = ("window_tokens", "active_tokens", "refresh_cycle")
CODE_TASKS = ("humaneval", "mbpp")  # lm-eval's unsafe (code-executing) tasks among the paper's
MATH_TASKS = ("minerva_math",)
REFERENCE = {"llada": "llada_8b_base"}  # expected.yaml's section per family (none is released for Dream)
COLUMNS = ["task", "method", "shots", "gen_length", "window", "n", "metric", "score", "stderr", "paper", "delta",
           "check", "s_per_sample", "tokens_per_s", "speedup", "gmacs_per_sample", "macs_ratio", "answer_tokens"]


@dataclass(frozen=True)
class TaskSetting:
    """One lm-eval task as the official scripts run it: shots, answer length, the reported metric (lm-eval's result
    key), and sampler settings that differ from the family's."""

    name: str
    num_fewshot: int | None
    gen_length: int | None
    metric: str | None = None
    sampler: dict = field(default_factory=dict)


PAPER_TASKS = {
    "llada": (TaskSetting("gsm8k", 4, 256, "exact_match,strict-match"),
              TaskSetting("minerva_math", 4, 256, "math_verify,none"),
              TaskSetting("humaneval", 0, 512, "pass@1,create_test"),
              TaskSetting("mbpp", 3, 512, "pass_at_1,none")),
    "dream": (TaskSetting("gsm8k_cot", 8, 256, "exact_match,strict-match"),
              TaskSetting("minerva_math", 4, 512, "math_verify,none"),
              TaskSetting("humaneval", 0, 512, "pass@1,create_test", {"refresh_cycle": 40, "top_p": 0.95}),
              TaskSetting("mbpp", 3, 512, "pass_at_1,none")),
}
SAMPLER_DEFAULTS = {  # the official scripts' model_args
    "llada": {"window_tokens": 64, "active_tokens": 16, "refresh_cycle": 32, "temperature": 0.0, "early_stop": False,
              "max_length": 4096},
    "dream": {"window_tokens": 128, "active_tokens": 16, "refresh_cycle": 32, "slide_window": True,
              "temperature": 0.0, "top_p": 0.99, "early_stop": False, "max_length": 2048},
}


def detect_family(folder: str | Path) -> str:
    """``"llada"`` or ``"dream"`` from a checkpoint folder's ``config.json`` (``model_type``)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"family: {str(folder)!r} has no config.json to read the model family from")
    model_type = str(json.loads(path.read_text()).get("model_type", "")).lower()
    if model_type not in FAMILIES:
        raise ValueError(f"family: config.json's model_type {model_type!r} is neither LLaDA's ('llada') nor Dream's "
                         "('Dream'); name the family")
    return model_type


def load_model(folder: str | Path, family: str, dtype: str = "bfloat16", device: str | torch.device = "cpu"
               ) -> DiffusionLM:
    """LLaDA or Dream from a local folder (:func:`load_llada` / :func:`load_dream`, no remote code), on ``device``."""
    check_choice(family, "family", FAMILIES)
    check_choice(dtype, "dtype", DTYPES)
    loader = load_llada if family == "llada" else load_dream
    return loader(folder, dtype=getattr(torch, dtype)).to(device).eval()


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer without running its code: ``AutoTokenizer`` unless the tokenizer config maps to remote
    code (Dream's ``DreamTokenizer``), then the fast tokenizer of ``tokenizer.json``, else Qwen2's BPE tokenizer on
    ``vocab.json`` / ``merges.txt`` (what Dream's tokenizer class extends), the special tokens from the config."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

    folder = Path(folder)
    config = folder / "tokenizer_config.json"
    remote = config.is_file() and "AutoTokenizer" in json.loads(config.read_text()).get("auto_map", {})
    if not remote:
        return AutoTokenizer.from_pretrained(folder)
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return Qwen2Tokenizer.from_pretrained(folder)
    raise ValueError(f"tokenizer: {str(folder)!r} maps its tokenizer to remote code and has neither tokenizer.json "
                     "nor vocab.json + merges.txt to load without it")


def task_spec(text: str) -> TaskSetting:
    """An argparse ``type``: ``NAME``, ``NAME:SHOTS`` or ``NAME:SHOTS:ANSWER_LENGTH`` (SHOTS may be empty)."""
    name, *rest = text.split(":")
    if not name or len(rest) > 2:
        raise argparse.ArgumentTypeError(f"expected NAME[:SHOTS[:ANSWER_LENGTH]], got {text!r}")
    numbers = []
    for part, low in zip(rest, (0, 1)):
        try:
            numbers.append(None if part == "" else int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME[:SHOTS[:ANSWER_LENGTH]] with integers, got {text!r}"
                                             ) from None
        if numbers[-1] is not None and numbers[-1] < low:
            raise argparse.ArgumentTypeError(f"{'shots' if low == 0 else 'answer length'} must be >= {low}, got "
                                             f"{text!r}")
    numbers += [None] * (2 - len(numbers))
    return TaskSetting(name, numbers[0], numbers[1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=existing("dir"), required=True,
                        help="local LLaDA-8B-Base or Dream-v0-Base-7B folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--family", choices=FAMILIES, default=None, help="default: config.json's model_type")
    parser.add_argument("--tokenizer", type=existing("dir"), default=None,
                        help="tokenizer folder (default: the model's)")
    parser.add_argument("--tasks", type=task_spec, nargs="+", default=None, metavar="NAME[:SHOTS[:LENGTH]]",
                        help="lm-eval tasks (default: the paper's four for the family)")
    parser.add_argument("--include-path", type=existing("dir"), default=None, help="an extra folder of lm-eval tasks")
    parser.add_argument("--no-builtin-tasks", action="store_true",
                        help="index only --include-path (lm-eval's own tasks take seconds to index)")
    parser.add_argument("--limit", type=POSITIVE, default=None, help="samples per task (default: all)")
    parser.add_argument("--method", choices=[*METHODS, "both"], default="both",
                        help="vanilla, window (Window-Diffusion) or both rows per task")
    parser.add_argument("--window-tokens", type=POSITIVE, default=None,
                        help="masks in the window (default: LLaDA 64, Dream 128)")
    parser.add_argument("--active-tokens", type=POSITIVE, default=None, help="active masks (default: 16)")
    parser.add_argument("--refresh-cycle", type=POSITIVE, default=None,
                        help="steps per phase (default: 32; Dream HumanEval 40)")
    parser.add_argument("--no-slide-window", action="store_true", help="Dream: fix the inner window's end per phase")
    parser.add_argument("--batch-size", type=POSITIVE, default=1,
                        help="requests per sampler call (the paper: 1, which the timings assume)")
    parser.add_argument("--max-length", type=POSITIVE, default=None,
                        help="prompt + answer tokens, prompts cut on the left (default: LLaDA 4096, Dream 2048)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--no-progress", action="store_true")


def default_out() -> Path:
    return Path("runs") / "window_diffusion" / "full"


def expected() -> dict:
    return yaml.safe_load(Path(__file__).with_name("expected.yaml").read_text())


def resolve_tasks(specs: list[TaskSetting] | None, family: str) -> list[TaskSetting]:
    """The command line's tasks with the table's shots, answer length, metric and sampler settings filled in."""
    own = {t.name: t for t in PAPER_TASKS[family]}
    known = {**{t.name: t for f in FAMILIES if f != family for t in PAPER_TASKS[f]}, **own}
    tasks = []
    for spec in specs or PAPER_TASKS[family]:
        base = known.get(spec.name, TaskSetting(spec.name, None, None))
        gen = spec.gen_length or base.gen_length
        if gen is None:
            raise SystemExit(f"--tasks: {spec.name!r} has no answer length in the paper's table; give it as "
                             f"{spec.name}:SHOTS:ANSWER_LENGTH")
        shots = base.num_fewshot if spec.num_fewshot is None else spec.num_fewshot
        tasks.append(TaskSetting(spec.name, shots, gen, base.metric, base.sampler if spec.name in own else {}))
    return tasks


def sampler_settings(family: str, task: TaskSetting, args: argparse.Namespace) -> dict:
    """The family's defaults, then the task's, then the command line's; validated, the error naming the option."""
    from prunelab.methods.window_diffusion import DreamWindow, WindowDiffusion

    settings = {**SAMPLER_DEFAULTS[family], **task.sampler}
    settings.update({k: getattr(args, k) for k in WINDOW_FIELDS if getattr(args, k) is not None})
    if family == "dream" and args.no_slide_window:
        settings["slide_window"] = False
    if args.max_length is not None:
        settings["max_length"] = args.max_length
    if settings["max_length"] <= task.gen_length:
        raise SystemExit(f"--max-length: {settings['max_length']} leaves no room for a prompt before {task.name}'s "
                         f"answer of {task.gen_length} tokens")
    window = {k: settings[k] for k in WINDOW_FIELDS}
    try:
        (DreamWindow(**window) if family == "dream" else WindowDiffusion(**window))
    except ValueError as err:
        name, _, message = str(err).partition(": ")
        raise SystemExit(f"--{name.replace('_', '-')}: {message}") from err
    return settings


def _math_extra() -> bool:
    try:
        if not metadata.version("antlr4-python3-runtime").startswith("4.11"):
            return False
        import math_verify  # noqa: F401
    except (ImportError, metadata.PackageNotFoundError):
        return False
    return True


def check_requirements(tasks: list[TaskSetting]) -> None:
    """Stop before loading the model when a task cannot run here (module docstring: MATH, code execution)."""
    names = [t.name for t in tasks]
    problems = []
    if any(n.startswith(MATH_TASKS) for n in names) and not _math_extra():
        problems.append("minerva_math needs lm-eval's math extra (antlr4-python3-runtime==4.11 and math-verify with "
                        "latex2sympy2_extended), which prunelab's environment cannot hold next to lmms-eval 0.7.3 "
                        "(its latex2sympy2 pins antlr4-python3-runtime==4.7.2): run it in an environment with "
                        "`pip install \"lm-eval[math]==0.4.13\"`, or leave it out")
    if any(n.startswith(CODE_TASKS) for n in names) and os.environ.get("HF_ALLOW_CODE_EVAL") != "1":
        problems.append(f"{', '.join(n for n in names if n.startswith(CODE_TASKS))} run the model's code against "
                        "the tasks' tests: export HF_ALLOW_CODE_EVAL=1 to consent (preferably in a sandbox), or "
                        "leave them out")
    if problems:
        raise SystemExit("--tasks: " + "; ".join(problems))


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _score(result: dict, task: TaskSetting) -> tuple[str, float, float]:
    """(metric key, score %, stderr %) of a task or group from lm-eval's results."""
    block = result["results"].get(task.name, {})
    keys = [k for k, v in block.items() if "," in k and "_stderr" not in k and not math.isnan(_number(v))]
    key = task.metric if task.metric in block else (keys[0] if keys else None)
    if key is None:
        return f"missing ({', '.join(block) or 'no results'})", float("nan"), float("nan")
    name, _, filt = key.partition(",")
    return key, 100 * _number(block[key]), 100 * _number(block.get(f"{name}_stderr,{filt}"))


def _paper(family: str, task: TaskSetting, settings: dict, paper: dict) -> dict | None:
    """The official reference of a windowed row when it runs the release's settings, else None."""
    ref = paper.get(REFERENCE.get(family), {})
    row = ref.get("tasks", {}).get(task.name)
    same = row and all(settings[k] == ref["settings"][k] for k in WINDOW_FIELDS) and \
        (task.num_fewshot, task.gen_length) == (row["num_fewshot"], row["gen_length"])
    return row if same else None


def _row(task, method, settings, lm, result, paper, limit) -> dict:
    recs = lm.records
    seconds = sum(r.seconds for r in recs)
    key, score, stderr = _score(result, task)
    row = {"task": task.name, "method": method, "shots": task.num_fewshot, "gen_length": task.gen_length,
           "window": "/".join(str(settings[k]) for k in WINDOW_FIELDS) if method == "window" else "-",
           "n": len(recs), "metric": key, "score": score, "stderr": stderr, "paper": "n/a", "delta": "n/a",
           "check": "n/a", "s_per_sample": seconds / max(len(recs), 1),
           "tokens_per_s": sum(r.gen_tokens for r in recs) / seconds if seconds > 0 else float("nan"),
           "macs_per_sample": sum(r.macs for r in recs) / max(len(recs), 1),
           "answer_tokens": sum(r.answer_tokens for r in recs) / max(len(recs), 1),
           "forward_tokens": sum(r.forward_tokens for r in recs) / max(len(recs), 1),
           "truncated_prompts": lm.truncated}
    row["gmacs_per_sample"] = row["macs_per_sample"] / 1e9
    ref = _paper(lm.family, task, settings, paper) if method == "window" else None
    if ref is not None:
        row["paper"], row["delta"] = ref["score"], score - ref["score"]
        tol = ref["tolerance"]
        row["check"] = f"n/a (--limit {limit})" if limit else \
            f"{'within' if abs(row['delta']) <= tol else 'outside'} ±{tol}"
        if ref.get("postprocessed"):
            row["check"] += "; paper post-processed"
    return row


def _relative(rows: list[dict]) -> None:
    """Speed-up and MACs ratio of each row against its task's vanilla row."""
    vanilla = {r["task"]: r for r in rows if r["method"] == "vanilla"}
    for r in rows:
        v = vanilla.get(r["task"])
        r["speedup"] = v["s_per_sample"] / r["s_per_sample"] if v and r["s_per_sample"] > 0 else "n/a"
        r["macs_ratio"] = v["macs_per_sample"] / r["macs_per_sample"] if v and r["macs_per_sample"] > 0 else "n/a"


def _write_samples(out: Path, task: TaskSetting, method: str, lm, result: dict) -> Path:
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task.name}_{method}.jsonl"
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in lm.records))
    logged = [s for samples in result.get("samples", {}).values() for s in samples]
    (folder / f"{task.name}_{method}_lm_eval.jsonl").write_text(
        "".join(json.dumps(s, default=str) + "\n" for s in logged))
    return path


def run(args: argparse.Namespace, out: Path) -> dict:
    out = Path(out)
    try:
        family = args.family or detect_family(args.model_dir)
    except ValueError as err:
        raise SystemExit(f"--family: {str(err).removeprefix('family: ')}") from err
    tasks = resolve_tasks(args.tasks, family)
    settings = {t.name: sampler_settings(family, t, args) for t in tasks}
    methods = METHODS if args.method == "both" else (args.method,)
    check_requirements(tasks)

    import lm_eval
    from lm_eval.tasks import TaskManager

    from .lm_eval_model import DiffusionLMEval

    manager = TaskManager(include_path=args.include_path, include_defaults=not args.no_builtin_tasks)
    unknown = [t.name for t in tasks if t.name not in manager.all_tasks]
    if unknown:
        raise SystemExit(f"--tasks: lm-eval knows no task {', '.join(map(repr, unknown))} (add a folder with "
                         "--include-path)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model_dir, family, args.dtype, device)
    tokenizer = load_tokenizer(args.tokenizer or args.model_dir)
    paper = expected()
    meta = provenance(
        preset="full", model_dir=str(args.model_dir), family=family, dtype=args.dtype, device=device,
        batch_size=args.batch_size, limit=args.limit or "all", lm_eval=metadata.version("lm_eval"),
        tasks={t.name: {"num_fewshot": t.num_fewshot, "gen_length": t.gen_length, **settings[t.name]} for t in tasks},
        steps="= answer length (one token per step)", code_execution="confirm_run_unsafe_code, HF_ALLOW_CODE_EVAL=1",
        timing="wall clock around the sampler per batch, split over its rows; tokens/s counts all G answer positions",
        paper_source=paper.get(REFERENCE.get(family), {}).get("source", "n/a (no official reference for this family)"))
    rows, sample_files = [], []
    for task in tasks:
        for method in methods:
            lm = DiffusionLMEval(model=model, tokenizer=tokenizer, family=family, method=method,
                                 gen_length=task.gen_length, batch_size=args.batch_size,
                                 progress=not args.no_progress, **settings[task.name])
            result = lm_eval.simple_evaluate(model=lm, tasks=[task.name], num_fewshot=task.num_fewshot,
                                             limit=args.limit, task_manager=manager, log_samples=True,
                                             confirm_run_unsafe_code=True)
            rows.append(_row(task, method, settings[task.name], lm, result, paper, args.limit))
            sample_files.append(str(_write_samples(out, task, method, lm, result)))
            _relative(rows)
            write_results(out, "lm_eval", rows, meta, COLUMNS,
                          f"Window-Diffusion, full preset: {family} on lm-evaluation-harness")
    print(markdown_table(rows, COLUMNS))
    return {"rows": rows, "provenance": meta, "samples": sample_files}
