"""``lora-llava data make-pretrain``: image-caption pairs -> stage-1 (projector alignment) conversations, as LLaVA v1
built CC3M-595K and LLaVA-1.5 LCS-558K: the human turn is one of the 11 brief-description instructions, chosen at
random, with the image before or after it (at random); the answer is the raw caption.

Inputs: a JSON list, JSONL, or CSV (with a header) of records with an image path (``image``, or ``file_name``) and a
caption (``caption``, ``blip_caption`` as in LCS-558K's meta file, or ``text``); an ``id`` is kept when present.
Choices are drawn from a generator seeded by ``seed`` and the record's position, so the same input and seed give
the same file, byte for byte.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..files import iter_jsonl, read_json, write_text_atomic

__all__ = ["BRIEF_INSTRUCTIONS", "PretrainSummary", "make_pretrain", "read_captions"]

BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
"""The 11 brief-description instructions of LLaVA's stage-1 data (the LLaVA paper, Table 8)."""

_IMAGE_KEYS = ("image", "file_name")
_CAPTION_KEYS = ("caption", "blip_caption", "text")


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) of every input record; ``where`` is "FILE line N" or "FILE record N"."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for line, value in iter_jsonl(path):
            yield f"{path} line {line}", value
    elif suffix == ".csv":
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:
                for n, row in enumerate(csv.DictReader(f), start=2):
                    yield f"{path} line {n}", row
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: cannot read it as CSV ({e})") from None
    else:
        for i, value in enumerate(read_json(path, list, "a JSON list of {image, caption} records")):
            yield f"{path} record {i}", value


def _field(record: dict, keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        value = record.get(key)
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: '{key}' must be a non-empty string; got {value!r}")
            return value.strip()
    raise DataError(f"{where}: no {' / '.join(repr(k) for k in keys)} field")


def read_captions(path: str | Path) -> list[tuple[str, str, str]]:
    """``(id, image, caption)`` of every record of ``path``; :class:`DataError` names the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"'{path}' does not exist" if not path.exists() else f"'{path}' is not a file")
    out = []
    for k, (where, record) in enumerate(_records(path)):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with an image and a caption; got {type(record).__name__}")
        image = _field(record, _IMAGE_KEYS, where)
        caption = _field(record, _CAPTION_KEYS, where)
        rid = record.get("id")
        out.append((str(rid) if rid not in (None, "") else Path(image).stem or str(k), image, caption))
    if not out:
        raise DataError(f"{path}: no records")
    seen: dict[str, int] = {}
    for k, (rid, _, _) in enumerate(out):
        if rid in seen:
            raise DataError(f"{path}: records {seen[rid]} and {k} have the same id '{rid}'")
        seen[rid] = k
    return out


@dataclasses.dataclass
class PretrainSummary:
    records: int
    image_first: int
    instructions: collections.Counter

    def format(self) -> str:
        lines = [f"records      {self.records}",
                 f"image first  {self.image_first} ({self.image_first / self.records:.0%}), after the instruction "
                 f"{self.records - self.image_first}",
                 "instructions:"]
        lines += [f"  {n:>6}  {text}" for text, n in sorted(self.instructions.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


def make_pretrain(captions: str | Path, out: str | Path, seed: int = 0) -> PretrainSummary:
    """Write the stage-1 conversations of ``captions`` to ``out`` (a LLaVA JSON list, written atomically)."""
    records, used, first = [], collections.Counter(), 0
    for k, (rid, image, caption) in enumerate(read_captions(captions)):
        rng = random.Random(f"{seed}:{k}")
        instruction = rng.choice(BRIEF_INSTRUCTIONS)
        before = rng.random() < 0.5
        first += before
        used[instruction] += 1
        question = f"<image>\n{instruction}" if before else f"{instruction}\n<image>"
        records.append({"id": rid, "image": image, "conversations": [{"from": "human", "value": question},
                                                                     {"from": "gpt", "value": caption}]})
    write_text_atomic(out, json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    return PretrainSummary(len(records), first, used)
