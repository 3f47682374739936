"""The benchmarks ``lora-llava eval`` knows: what each scores against, and one entry point that scores an answer
file. The published LLaVA-1.5 figures come from specs/evaluation.md (LLaVA's docs/MODEL_ZOO.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError, UsageError
from .answers import Answer, Scores, read_answers, read_jsonl_objects
from .closed import score_gqa, score_mme, score_pope, score_scienceqa
from .custom import score_custom
from .vqa import score_textvqa, score_vqav2

__all__ = ["ANNOTATIONS", "BENCHMARKS", "JUDGED", "PUBLISHED", "PUBLISHED_SOURCE", "score_answers"]

ANNOTATIONS = {
    "vqav2": "VQA annotations JSON (v2_mscoco_val2014_annotations.json); without it only the submission is written",
    "textvqa": "TextVQA_0.5.1_val.json",
    "gqa": "testdev_balanced_questions.json",
    "scienceqa": "folder with problems.json and pid_splits.json",
    "pope": "folder with coco_pope_{adversarial,popular,random}.json",
    "mme": "the MME benchmark folder (MME_Benchmark_release_version)",
    "llava-bench": "folder with context.jsonl and answers_gpt4.jsonl (llava-bench-in-the-wild)",
    "mm-vet": "mm-vet.json",
    "custom": "the held-out LLaVA JSON (default: the questions file)",
}
"""What ``--annotations`` is for each benchmark."""

BENCHMARKS = tuple(ANNOTATIONS)
JUDGED = ("llava-bench", "mm-vet")

# Published LLaVA-1.5 results (LLaVA's docs/MODEL_ZOO.md, as quoted in specs/evaluation.md): benchmark -> (metric
# they correspond to, {model: figure}).
PUBLISHED_SOURCE = "LLaVA-1.5 results, haotian-liu/LLaVA docs/MODEL_ZOO.md (via specs/evaluation.md)"
_MODELS = ("7B full", "13B full", "7B LoRA", "13B LoRA")
_TABLE = {
    "vqav2": ("accuracy", (78.5, 80.0, 79.1, 80.0)),
    "gqa": ("accuracy", (62.0, 63.3, 63.0, 63.3)),
    "scienceqa": ("img_accuracy", (66.8, 71.6, 68.4, 71.2)),
    "textvqa": ("accuracy", (58.2, 61.3, 58.2, 60.2)),
    "pope": ("f1", (85.9, 85.9, 86.4, 86.7)),
    "mme": ("perception", (1510.7, 1531.3, 1476.9, 1541.7)),
    "llava-bench": ("relative", (65.4, 72.5, 67.9, 69.5)),
    "mm-vet": ("total", (31.1, 36.1, 30.2, 38.3)),
}
PUBLISHED: dict[str, tuple[str, dict[str, float]]] = {b: (m, dict(zip(_MODELS, v))) for b, (m, v) in _TABLE.items()}
"""benchmark -> (our metric it compares with, {model: published figure}); POPE's F1 is in percent there."""


def _pope_categories(questions: str | Path | None, answers: list[Answer]) -> dict[Any, str]:
    if questions is not None:
        cats = {}
        for number, row in read_jsonl_objects(questions, "questions file"):
            if not row.get("category"):
                raise DataError(f"{questions}, line {number}: no 'category' (POPE questions carry adversarial, "
                                "popular or random)")
            cats[row.get("question_id")] = row["category"]
        return cats
    cats = {a.question_id: (a.raw.get("metadata") or {}).get("category") for a in answers}
    missing = next((a for a in answers if not cats[a.question_id]), None)
    if missing is not None:
        raise UsageError(f"pope: --questions is needed (the POPE question file gives each question's category; "
                         f"{missing.where} has no metadata.category)")
    return cats


def score_answers(benchmark: str, answers_file: str | Path, annotations: str | Path | None,
                  questions: str | Path | None = None, *, judge=None, only: set | None = None,
                  cache_dir: str | Path | None = None) -> Scores:
    """Score a LLaVA answer file for ``benchmark``; errors name the file and line of what does not fit."""
    if benchmark not in BENCHMARKS:
        raise UsageError(f"unknown benchmark '{benchmark}'; one of {', '.join(BENCHMARKS)}")
    if benchmark == "custom" and annotations is None:
        annotations = questions
    if annotations is None:
        raise UsageError(f"{benchmark}: --annotations is needed ({ANNOTATIONS[benchmark]})")
    if not Path(annotations).exists():
        raise DataError(f"{benchmark} annotations '{annotations}' do not exist ({ANNOTATIONS[benchmark]})")
    answers = read_answers(answers_file)
    if benchmark == "textvqa":
        return score_textvqa(answers, annotations)
    if benchmark == "vqav2":
        return score_vqav2(answers, annotations)
    if benchmark == "gqa":
        return score_gqa(answers, annotations)
    if benchmark == "scienceqa":
        return score_scienceqa(answers, annotations, only=only)
    if benchmark == "pope":
        return score_pope(answers, annotations, _pope_categories(questions, answers))
    if benchmark == "mme":
        return score_mme(answers, annotations)
    if benchmark == "custom":
        scores = score_custom(answers, annotations)
        if judge is not None:
            from .custom import judge_custom

            judge_custom(scores, answers, annotations, questions, judge, cache_dir)
        return scores
    from .judge import score_judged

    if judge is None:
        raise UsageError(f"{benchmark} is scored by a judge model: give --judge-url and --judge-model")
    return score_judged(benchmark, answers, annotations, questions, judge, cache_dir=cache_dir)
