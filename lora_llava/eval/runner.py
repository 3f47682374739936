"""``eval run``: answer a benchmark's questions with a run folder, checkpoint or export - LLaVA-1.5's protocol
(the run's template, greedy, ``max_new_tokens`` 128, pad-to-square images) - into ``answers.jsonl`` in LLaVA's
answer format, resumable, then score it when annotations are given."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, UsageError
from ..files import BadLine, iter_jsonl, write_text_atomic
from .answers import Scores
from .benchmarks import BENCHMARKS, JUDGED, score_answers
from .questions import read_benchmark_questions

logger = logging.getLogger(__name__)

__all__ = ["ANSWERS_FILE", "MMVET_RESULTS", "SCORES_FILE", "VQAV2_SUBMISSION", "EvalResult", "answered_keys",
           "run_eval"]

ANSWERS_FILE = "answers.jsonl"
SCORES_FILE = "scores.json"
VQAV2_SUBMISSION = "vqav2_submission.json"  # what EvalAI takes for test-dev
MMVET_RESULTS = "mm-vet_results.json"  # what MM-Vet's grader takes


@dataclass
class EvalResult:
    """What :func:`run_eval` did: the answer file, how many answers it wrote now and had already, the scores."""

    answers_file: Path
    written: int
    skipped: int
    scores: Scores | None
    scores_file: Path | None


def _key(question_id: Any, prompt: str) -> str:
    # MME asks two questions per image under one question_id: the prompt tells them apart.
    return json.dumps([question_id, prompt])


def answered_keys(path: Path, model_id: str | None = None) -> set[str]:
    """Keys of the questions ``path`` already answers. A last line cut short by an interrupted run is removed.
    Answers of another ``model_id`` are refused: resuming would mix two models in one file."""
    if not path.is_file():
        return set()
    rows = list(iter_jsonl(path, strict=False))
    bad = [(n, r) for n, r in rows if isinstance(r, BadLine) or not isinstance(r, dict) or "question_id" not in r]
    if bad and bad[-1][0] == rows[-1][0] and len(bad) == 1:
        logger.warning("%s: line %d was cut short by an interrupted run; answering it again", path, bad[0][0])
        good = [json.dumps(r) + "\n" for _, r in rows[:-1]]
        path.write_text("".join(good), encoding="utf-8")
        rows = rows[:-1]
    elif bad:
        raise DataError(f"{path}, line {bad[0][0]}: not an answer line; move the file away to start over")
    if model_id is not None:
        other = next(((n, r) for n, r in rows if r.get("model_id", model_id) != model_id), None)
        if other is not None:
            raise UsageError(f"{path}, line {other[0]}: an answer of model_id '{other[1].get('model_id')}', not "
                             f"'{model_id}'; resuming would mix two models in one file (use another --out, or "
                             "--model-id to continue that model's answers)")
    return {_key(r["question_id"], r.get("prompt", "")) for _, r in rows}


def run_eval(path: str | Path | None, benchmark: str, questions: str | Path, out_dir: str | Path, *,
             image_folder: str | Path | None = None, annotations: str | Path | None = None, batch_size: int = 8,
             limit: int | None = None, max_new_tokens: int = 128, model_id: str | None = None,
             template: str | None = None, device: str | None = None, bits: int | None = None, loaded=None,
             judge=None, progress: bool = True) -> EvalResult:
    """Answer ``questions`` (the first ``limit``) with the model at ``path`` (or ``loaded``, a
    :class:`~lora_llava.infer.load.LoadedModel`), appending to ``out_dir/answers.jsonl`` (questions it already
    answers are skipped: an interrupted run resumes); then, with ``annotations`` (for ``custom`` the questions file
    itself), score it into ``out_dir/scores.json``."""
    if benchmark not in BENCHMARKS:
        raise UsageError(f"unknown benchmark '{benchmark}'; one of {', '.join(BENCHMARKS)}")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise DataError(f"--image-folder: '{image_folder}' is not a folder")
    if benchmark in JUDGED and annotations is not None and judge is None:
        raise UsageError(f"{benchmark} is scored by a judge model: give --judge-url and --judge-model (or leave out "
                         "--annotations to only answer)")
    items = read_benchmark_questions(benchmark, questions, image_folder)
    if limit is not None:
        items = items[:limit]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    answers_file = out / ANSWERS_FILE
    model_id = model_id or Path(path or (loaded.path if loaded is not None else None) or "model").resolve().name
    done = answered_keys(answers_file, model_id)
    todo = [q for q in items if _key(q["question_id"], q["prompt"]) not in done]
    skipped = len(items) - len(todo)
    if skipped:
        logger.info("%s: %d of %d questions already answered; answering the other %d", answers_file, skipped,
                    len(items), len(todo))
    if todo:
        _answer_all(path, loaded, todo, answers_file, image_folder, batch_size, max_new_tokens, model_id, template,
                    device, bits, progress)
    if benchmark == "vqav2":
        from .answers import read_answers
        from .vqa import write_vqav2_submission

        write_vqav2_submission(read_answers(answers_file), questions, out / VQAV2_SUBMISSION)
    if benchmark == "mm-vet":  # what MM-Vet's official grader reads: {question_id: answer}
        from .answers import read_answers

        write_text_atomic(out / MMVET_RESULTS, json.dumps({a.question_id: a.text for a in read_answers(answers_file)},
                                                          indent=1))
    scores = scores_file = None
    if annotations is not None or benchmark == "custom":
        only = {q["question_id"] for q in items} if limit is not None else None
        scores = score_answers(benchmark, answers_file, annotations, questions, judge=judge, only=only,
                               cache_dir=out / "judge_cache")
        scores_file = scores.write(out / SCORES_FILE)
    return EvalResult(answers_file, len(todo), skipped, scores, scores_file)


def _answer_all(path, loaded, todo, answers_file: Path, image_folder, batch_size: int, max_new_tokens: int,
                model_id: str | None, template: str | None, device, bits, progress: bool) -> None:
    from tqdm.auto import tqdm

    from ..infer.generate import generate_answers
    from ..infer.load import load_for_inference

    if loaded is None:
        loaded = load_for_inference(path, device, bits=bits)
    template = template or loaded.template
    if template == "plain" and any(q["image"] is None for q in todo):
        q = next(q for q in todo if q["image"] is None)
        raise DataError(f"question {q['question_id']!r} has no image, but the plain template (a stage-1 run) only "
                        "captions images")
    start = time.monotonic()
    with answers_file.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc="answering", unit="q",
                                                              dynamic_ncols=True, disable=not progress) as bar:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            texts = generate_answers(loaded.model, loaded.processor, [q["turns"] for q in chunk],
                                     [[q["image"]] if q["image"] is not None else [] for q in chunk],
                                     str(image_folder) if image_folder is not None else None, template=template,
                                     image_aspect_ratio=loaded.image_aspect_ratio, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size)
            for q, text in zip(chunk, texts):
                metadata = {"category": q["category"]} if q.get("category") is not None else {}
                f.write(json.dumps({"question_id": q["question_id"], "prompt": q["prompt"], "text": text,
                                    "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": metadata})
                        + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(chunk))
    logger.info("%d answers in %.1f s", len(todo), time.monotonic() - start)
