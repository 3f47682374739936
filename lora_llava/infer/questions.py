"""LLaVA's evaluation question files: JSONL of ``{"question_id", "image", "text"}``, checked line by line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import load_image, resolve_image_path
from ..errors import DataError, ImageError, InferenceError
from ..files import iter_jsonl
from .chat import with_image_tag

__all__ = ["check_question_image", "read_questions"]


def check_question_image(where: str, image_folder, image: Any) -> Path:
    """The file of a question's ``image`` (a path under ``image_folder``); :class:`DataError` naming ``where``."""
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: image: expected a path relative to the image folder, got {image!r}")
    try:
        file = resolve_image_path(image_folder, image)
    except ImageError as e:
        raise DataError(f"{where}: {e}") from None
    if not file.is_file():
        raise DataError(f"{where}: image '{image}' not found (looked at '{file}')")
    return file


def read_questions(path: str | Path, image_folder: str | Path | None) -> list[dict[str, Any]]:
    """The records of a LLaVA evaluation question file (JSONL of ``{"question_id", "image", "text"}``), checked.

    Each record comes back with ``turns``: the one human turn to answer, ``<image>\\n`` put in front of the text when
    the record has an image and the text has no tag (as LLaVA's ``model_vqa`` does). Blank lines are skipped. Any
    problem raises :class:`DataError` naming the file and line: not a JSON object, no ``question_id`` or ``text``, a
    ``question_id`` given twice (both lines named), an image that leaves ``image_folder``, is not there or cannot be
    decoded (each image is decoded here, so nothing fails after answers were generated), ``<image>`` tags that do
    not match the image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"questions file '{path}' does not exist")
    records = []
    seen: dict[str, int] = {}
    decoded: set[str] = set()
    for number, record in iter_jsonl(path):
        where = f"{path}, line {number}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with question_id, image and text, got "
                            f"{type(record).__name__}")
        if record.get("question_id") is None:
            raise DataError(f"{where}: no question_id")
        qid = record["question_id"]
        key = repr(qid) if not isinstance(qid, (str, int)) else str(qid)
        if key in seen:
            raise DataError(f"{where}: question_id {qid!r} again (first on line {seen[key]}); each question needs its "
                            "own id, or its answers cannot be told apart")
        seen[key] = number
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: text: expected the question as a non-empty string, got {text!r}")
        image = record.get("image")
        if image is not None:
            check_question_image(where, image_folder, image)
            if image not in decoded:
                try:
                    load_image(image_folder, image, aspect="resize")
                except ImageError as e:
                    raise DataError(f"{where} (question_id {qid!r}): {e}") from None
                decoded.add(image)
        try:
            turns = with_image_tag([("human", text)], image is not None)
        except InferenceError as e:
            raise DataError(f"{where}: text: {str(e).removeprefix('turn 1 ')}") from None
        records.append({"question_id": record["question_id"], "text": text, "image": image, "turns": turns,
                        "line": number})
    if not records:
        raise DataError(f"questions file '{path}' has no questions")
    return records
