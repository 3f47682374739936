"""VQAv2 and TextVQA: VQA accuracy over ten human answers, with the VQA challenge's answer normalisation; and the
VQAv2 test-dev submission file (the answers normalised, every test question present, unanswered ones empty)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..files import write_text_atomic
from .answers import Answer, Scores, read_json_file, read_jsonl_objects
from .normalize import normalize_answer, soft_scores

__all__ = ["score_textvqa", "score_vqav2", "textvqa_question", "write_vqav2_submission"]

_OCR = "Reference OCR token: "


def textvqa_question(prompt: str) -> str | None:
    """The bare question of a TextVQA prompt as LLaVA's question files write it (lower-cased), or None when the
    prompt has none of their shapes: ``OCR tokens: ... Question: Q Short answer:``, ``Q\\nReference OCR token: ...
    \\nSUFFIX`` (or the OCR line first), ``Q\\nSUFFIX``."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        start = prompt.find("Question: ")
        end = prompt.find(" Short answer:", start + len("Question: ")) if start >= 0 else -1
        if start < 0 or end < 0:
            return None
        question = prompt[start + len("Question: "):end]
    elif _OCR in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith(_OCR.rstrip()) else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        return None
    return question.lower()


def _mean_percent(values: list[float]) -> float:
    return 100.0 * (sum(values) / len(values))


def score_textvqa(answers: list[Answer], annotations: str | Path) -> Scores:
    """TextVQA accuracy (x100) of the answers against ``TextVQA_0.5.1_val.json``.

    An answer is matched to its annotation by (image id, lower-cased question) - LLaVA's TextVQA question files use
    the image id as ``question_id`` and the question is read back from the prompt - or, failing that, by TextVQA's own
    ``question_id``. An answer that matches nothing is an error naming its line.
    """
    data = read_json_file(annotations, dict, "TextVQA annotations (TextVQA_0.5.1_val.json, an object with 'data')")
    records = data.get("data")
    if not isinstance(records, list):
        raise DataError(f"{annotations}: no 'data' list (expected TextVQA_0.5.1_val.json)")
    by_key, by_id = {}, {}
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("answers"), list) or "question" not in r:
            raise DataError(f"{annotations}: data[{i}] has no 'question' and 'answers'")
        by_key[(r.get("image_id"), str(r["question"]).lower())] = r
        by_id[r.get("question_id")] = r
    scores = []
    for a in answers:
        question = textvqa_question(a.prompt)
        record = by_key.get((a.question_id, question)) if question is not None else None
        if record is None:
            record = by_id.get(a.question_id)
        if record is None:
            raise DataError(f"{a.where}: question_id {a.question_id!r} (question {question!r}) is not in {annotations} "
                            "(answers of another benchmark or split?)")
        scores.append(soft_scores(record["answers"]).get(normalize_answer(a.text), 0.0))
    return Scores("textvqa", {"accuracy": _mean_percent(scores)}, n=len(scores))


def score_vqav2(answers: list[Answer], annotations: str | Path) -> Scores:
    """VQAv2 accuracy (x100) against the VQA annotations (``v2_mscoco_val2014_annotations.json``, or any file in
    that format), overall and per answer type (yes/no, number, other)."""
    data = read_json_file(annotations, dict, "VQAv2 annotations (an object with 'annotations')")
    records = data.get("annotations")
    if not isinstance(records, list):
        raise DataError(f"{annotations}: no 'annotations' list (expected v2_mscoco_val2014_annotations.json)")
    by_id: dict[Any, dict] = {}
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("answers"), list):
            raise DataError(f"{annotations}: annotations[{i}] has no 'answers' list")
        by_id[r.get("question_id")] = r
    scores, per_type = [], defaultdict(list)
    for a in answers:
        record = by_id.get(a.question_id)
        if record is None:
            raise DataError(f"{a.where}: question_id {a.question_id!r} is not in {annotations} (answers of another "
                            "benchmark or split?)")
        truth = [x["answer"] if isinstance(x, dict) else x for x in record["answers"]]
        score = soft_scores(truth).get(normalize_answer(a.text), 0.0)
        scores.append(score)
        per_type[record.get("answer_type", "all")].append(score)
    per_category = {k: {"accuracy": _mean_percent(v), "n": len(v)} for k, v in sorted(per_type.items())}
    return Scores("vqav2", {"accuracy": _mean_percent(scores)}, per_category, n=len(scores))


def write_vqav2_submission(answers: list[Answer], questions: str | Path, out: str | Path) -> dict[str, int]:
    """Write the EvalAI submission JSON: ``[{"question_id", "answer"}]`` for every question of ``questions`` (LLaVA's
    ``llava_vqav2_mscoco_test2015.jsonl``), in its order; answers normalised, unanswered questions ``""``."""
    texts = {a.question_id: a.text for a in answers}
    rows, missing = [], 0
    for _, q in read_jsonl_objects(questions, "questions file"):
        qid = q.get("question_id")
        if qid in texts:
            rows.append({"question_id": qid, "answer": normalize_answer(texts[qid])})
        else:
            missing += 1
            rows.append({"question_id": qid, "answer": ""})
    write_text_atomic(out, json.dumps(rows))
    return {"questions": len(rows), "unanswered": missing}
