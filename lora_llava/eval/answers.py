"""Answer files in LLaVA's format (JSONL of ``{"question_id", "prompt", "text", "answer_id", "model_id",
"metadata"}``), read and checked line by line, and the score file every benchmark writes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..files import iter_jsonl, read_json, write_text_atomic

__all__ = ["Answer", "Scores", "read_answers", "read_json_file", "read_jsonl_objects", "read_llava_records"]


@dataclass
class Answer:
    """One line of an answer file; ``where`` is ``"FILE, line N"`` for error messages."""

    question_id: Any
    text: str
    prompt: str
    where: str
    line: int
    raw: dict = field(repr=False, default_factory=dict)


def read_jsonl_objects(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` of a JSONL file whose lines must all be JSON objects; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} '{path}' does not exist" if not path.exists() else f"{what} '{path}' is not a file")
    rows = []
    for number, value in iter_jsonl(path):
        if not isinstance(value, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(value).__name__}")
        rows.append((number, value))
    return rows


def read_json_file(path: str | Path, expect: type, what: str) -> Any:
    """A JSON file of the given type; errors name the file (and line for bad JSON)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} '{path}' does not exist" if not path.exists() else f"{what} '{path}' is not a file")
    return read_json(path, expect, what)


def read_llava_records(path: str | Path) -> list[Any]:
    """The records of a LLaVA data file: a JSON list, or JSONL (one record a line) for a ``.jsonl`` file."""
    if Path(path).suffix == ".jsonl":
        return [row for _, row in read_jsonl_objects(path, "LLaVA data file")]
    return read_json_file(path, list, "a JSON list of LLaVA records (id, image, conversations)")


def read_answers(path: str | Path) -> list[Answer]:
    """The answers of a LLaVA answer file, in file order. Every line needs ``question_id`` and a string ``text``;
    ``prompt`` is optional (empty when absent). Errors name the file and line."""
    answers = []
    for number, row in read_jsonl_objects(path, "answers file"):
        where = f"{path}, line {number}"
        if row.get("question_id") is None:
            raise DataError(f"{where}: no question_id (is this a LLaVA answer file?)")
        if not isinstance(row.get("text"), str):
            raise DataError(f"{where}: text: expected the answer as a string, got {row.get('text')!r}")
        prompt = row.get("prompt", "")
        answers.append(Answer(row["question_id"], row["text"], prompt if isinstance(prompt, str) else "", where,
                              number, row))
    if not answers:
        raise DataError(f"answers file '{path}' has no answers")
    return answers


@dataclass
class Scores:
    """What a scorer returns: the headline metrics (``metrics``, in order, the first is the benchmark's figure),
    per-category metrics, how many answers were scored and how many could not be parsed."""

    benchmark: str
    metrics: dict[str, float]
    per_category: dict[str, dict[str, Any]] = field(default_factory=dict)
    n: int = 0
    failed_to_parse: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> tuple[str, float]:
        name = next(iter(self.metrics))
        return name, self.metrics[name]

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": self.benchmark, **self.metrics, "per_category": self.per_category, "n": self.n,
                "failed_to_parse": self.failed_to_parse, **self.extra}

    def write(self, path: str | Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    def table(self) -> str:
        """The scores as a small text table."""
        lines = [f"{self.benchmark}: {self.n} answers scored, {self.failed_to_parse} not parsed"]
        width = max([len(k) for k in self.metrics] + [len(k) + 2 for k in self.per_category] + [8])
        for key, value in self.metrics.items():
            lines.append(f"  {key:<{width}}  {_fmt(value)}")
        for cat, values in self.per_category.items():
            shown = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())
            lines.append(f"    {cat:<{width - 2}}  {shown}")
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
