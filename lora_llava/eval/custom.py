"""``custom``: the user's own held-out LLaVA JSON. The first answer of each record is the truth; an answer scores by
exact match (whitespace-stripped) and by match after the VQA normalisation (case, punctuation, articles, number
words)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import DataError
from .answers import Answer, Scores, read_llava_records
from .normalize import normalize_answer

__all__ = ["accuracy_line", "judge_custom", "read_custom_truth", "score_custom"]


def read_custom_truth(path: str | Path) -> dict[Any, tuple[str, Any]]:
    """``id -> (first answer, category)`` of a LLaVA JSON file (records without an ``id`` are numbered from 0)."""
    records = read_llava_records(path)
    truth = {}
    for i, r in enumerate(records):
        convs = r.get("conversations") if isinstance(r, dict) else None
        answer = convs[1].get("value") if isinstance(convs, list) and len(convs) > 1 and isinstance(convs[1], dict) \
            else None
        if not isinstance(answer, str):
            raise DataError(f"{path}, record {i}: conversations[1]: expected the reference answer (from 'gpt')")
        truth[r.get("id", i)] = (answer, r.get("category"))
    return truth


def score_custom(answers: list[Answer], annotations: str | Path) -> Scores:
    """``vqa_match`` (x100: the normalised answer equals the normalised truth) and ``exact_match`` (x100), overall and
    per ``category`` when the records have one."""
    truth = read_custom_truth(annotations)
    vqa, exact, per_cat = [], [], defaultdict(list)
    for a in answers:
        if a.question_id not in truth:
            raise DataError(f"{a.where}: question_id {a.question_id!r} is not a record id of {annotations}")
        expected, category = truth[a.question_id]
        ok = normalize_answer(a.text) == normalize_answer(expected)
        vqa.append(ok)
        exact.append(a.text.strip() == expected.strip())
        if category is not None:
            per_cat[str(category)].append(ok)
    n = len(answers)
    return Scores("custom", {"vqa_match": 100.0 * sum(vqa) / n, "exact_match": 100.0 * sum(exact) / n},
                  {k: {"vqa_match": 100.0 * sum(v) / len(v), "n": len(v)} for k, v in sorted(per_cat.items())},
                  n=n, extra={"correct": sum(vqa)})


def judge_custom(scores: Scores, answers: list[Answer], annotations: str | Path, questions: str | Path | None,
                 judge, cache_dir: str | Path | None) -> None:
    """Add ``judge`` (x100) to ``scores``: a judge model grades each answer 0.0-1.0 against the record's answer, as
    MM-Vet is graded (the question is the record's first human turn)."""
    from .judge import judge_correctness

    records = read_llava_records(annotations)
    asked = {r.get("id", i): str(r["conversations"][0].get("value", "")).replace("<image>", "").strip()
             for i, r in enumerate(records)}
    truth = read_custom_truth(annotations)
    items = [(a, asked.get(a.question_id, a.prompt), truth[a.question_id][0], []) for a in answers]
    cache = Path(cache_dir) if cache_dir is not None else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    runs, _, _, failed = judge_correctness(items, judge, cache)
    scores.metrics["judge"] = sum(runs) / len(runs)
    scores.extra.update({"judge_runs": runs, "judge_model": judge.model, "judge_failed_to_parse": failed})


def accuracy_line(scores: Scores) -> str:
    """The one-line held-out accuracy of a ``custom`` score (what ``sft`` and ``eval run`` print)."""
    correct = scores.extra["correct"]
    return (f"held-out accuracy: {correct / scores.n:.3f} ({correct}/{scores.n}, the answer equals the record's after "
            "VQA normalisation; lora-llava eval, benchmark custom)")
