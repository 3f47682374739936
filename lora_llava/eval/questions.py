"""The questions a benchmark asks, read as LLaVA's eval bundle distributes them, with the prompt LLaVA saves in its
answer files: JSONL question files (``{"question_id", "image", "text", "category"}``), ScienceQA's conversation-format
JSON (``llava_test_CQM-A.json``) and the user's own LLaVA JSON (``custom``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..infer.questions import check_question_image, read_questions
from .answers import read_jsonl_objects, read_llava_records

__all__ = ["SCIENCEQA_SUFFIX", "Question", "read_benchmark_questions"]

SCIENCEQA_SUFFIX = "Answer with the option's letter from the given choices directly."


class Question(dict):
    """``question_id``, ``prompt`` (saved in the answer file), ``turns`` (what the model is asked), ``image``,
    ``category``, ``line`` (where it is in its file, for messages) and, for ``custom``, ``truth``."""


def _conversation_questions(path: Path, image_folder, benchmark: str) -> list[Question]:
    """ScienceQA's and custom's LLaVA JSON: the first human turn is the question, the first answer the truth."""
    records = read_llava_records(path)
    out = []
    for i, r in enumerate(records):
        where = f"{path}, record {i}"
        convs = r.get("conversations") if isinstance(r, dict) else None
        if not isinstance(convs, list) or not convs or not isinstance(convs[0], dict) \
                or not isinstance(convs[0].get("value"), str):
            raise DataError(f"{where}: expected {{'id', 'image', 'conversations': [{{'from': 'human', 'value': ...}}, "
                            "...]}")
        qid = r.get("id", i)
        where = f"{path}, record {i} (id {qid!r})"
        image = r.get("image")
        if image is not None:
            check_question_image(where, image_folder, image)
        question = convs[0]["value"].replace("<image>", "").strip()
        prompt = question
        if benchmark == "scienceqa":  # LLaVA-1.5 asks for the letter (model_vqa_science --single-pred-prompt)
            question = f"{question}\n{SCIENCEQA_SUFFIX}"
            prompt = f"{prompt}\n{SCIENCEQA_SUFFIX}"
        if image is not None:
            question = f"<image>\n{question}"
            if benchmark == "scienceqa":
                prompt = f"<image>\n{prompt}"
        truth = None
        if benchmark == "custom":
            answer = convs[1] if len(convs) > 1 and isinstance(convs[1], dict) else {}
            truth = answer.get("value")
            if not isinstance(truth, str):
                raise DataError(f"{where}: conversations[1]: expected the reference answer (from 'gpt')")
        out.append(Question(question_id=qid, prompt=prompt, turns=[("human", question)], image=image,
                            category=r.get("category"), line=i, truth=truth))
    if not out:
        raise DataError(f"questions file '{path}' has no questions")
    return out


def read_benchmark_questions(benchmark: str, path: str | Path, image_folder: str | Path | None) -> list[Question]:
    """The questions of ``path`` for ``benchmark``, checked (images present under ``image_folder``); errors name
    the file and line (or record)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"questions file '{path}' does not exist" if not path.exists()
                        else f"questions file '{path}' is not a file")
    if benchmark in ("scienceqa", "custom"):
        return _conversation_questions(path, image_folder, benchmark)
    categories = {number: row.get("category") for number, row in read_jsonl_objects(path, "questions file")}
    return [Question(question_id=q["question_id"], prompt=q["text"], turns=q["turns"], image=q["image"],
                     category=categories.get(q["line"]), line=q["line"], truth=None)
            for q in read_questions(path, image_folder)]
