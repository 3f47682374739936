"""Readers: LLaVA JSON / JSONL files and Python records, into one :class:`Sample` type.

Every record is checked here, before any tokenization, and a bad one raises :class:`DataError` naming the file, the
record and the field.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..files import iter_jsonl, read_json
from ..llava.constants import PAD_TOKEN
from .templates import IMAGE_TAG

__all__ = ["Sample", "is_hf_source", "iter_file", "iter_hf", "iter_raw", "place_image", "read_records",
           "sample_from_record"]

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclasses.dataclass
class Sample:
    """One training sample: alternating human / gpt turns and the images its ``<image>`` tags refer to."""

    id: str
    turns: list[tuple[str, str]]
    images: list[str] = dataclasses.field(default_factory=list)
    where: str = ""
    """``file, record N`` for error messages."""


def _where(path: str | None, index: int) -> str:
    return f"{path}, record {index}" if path else f"record {index}"


def sample_from_record(record: Any, index: int, path: str | None = None) -> Sample:
    """Check one LLaVA-format record and turn it into a :class:`Sample`."""
    where = _where(path, index)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with 'conversations', got {type(record).__name__}")
    convs = record.get("conversations")
    if convs is None:
        raise DataError(f"{where}: field 'conversations' is missing")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for j, turn in enumerate(convs):
        field = f"conversations[{j}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {field} must be an object with 'from' and 'value'")
        role = turn.get("from")
        value = turn.get("value")
        if role not in _ROLES:
            raise DataError(f"{where}: {field}.from is {role!r}; expected 'human' or 'gpt'")
        if not isinstance(value, str):
            raise DataError(f"{where}: {field}.value must be a string, got {type(value).__name__}")
        role = _ROLES[role]
        expected = "human" if j % 2 == 0 else "gpt"
        if role != expected:
            raise DataError(f"{where}: {field}.from is '{turn.get('from')}' but turns must alternate human/gpt "
                            f"starting with human (expected '{expected}')")
        if role == "gpt" and not value.strip():
            raise DataError(f"{where}: {field}.value is an empty answer")
        if PAD_TOKEN in value:
            # Our tokenizer has <pad> as a token (the reference's has not and reads the text): refuse, never train on
            # a padding token written in the data.
            raise DataError(f"{where}: {field}.value contains '{PAD_TOKEN}', which the tokenizer would read as its "
                            "padding token (the LLaVA reference reads it as text); remove it or write it differently")
        turns.append((role, value))
    if turns[-1][0] != "gpt":
        raise DataError(f"{where}: the conversation ends on a human turn (its last question has no answer)")
    image = record.get("image")
    if image is None:
        images: list[str] = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(i, str) for i in image):
        images = list(image)
    else:
        raise DataError(f"{where}: field 'image' must be a path or a list of paths")
    tags = sum(value.count(IMAGE_TAG) for _, value in turns)
    if images and tags == 0:
        # LLaVA's data puts the tag in the first question. The reference trains a record without one as text only:
        # its image is loaded and then never used. Ours puts the tag in front of the first question instead, so the
        # image is seen (README, "Data format").
        role, value = turns[0]
        turns[0] = (role, IMAGE_TAG * len(images) + "\n" + value)
        tags = len(images)
    if tags != len(images):
        raise DataError(f"{where}: the text has {tags} '<image>' tag(s) but field 'image' gives {len(images)} image(s)")
    if any(IMAGE_TAG in value for role, value in turns if role == "gpt"):
        raise DataError(f"{where}: an answer contains '<image>'; images belong in human turns")
    sid = record.get("id", index)
    return Sample(id=str(sid), turns=turns, images=images, where=where)


def iter_file(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, raw record) of a JSON list or JSONL file; malformed JSON raises DataError with line and column."""
    if path.suffix == ".jsonl":
        for number, record in iter_jsonl(path):
            yield number - 1, record
        return
    yield from enumerate(read_json(path, list, "a JSON list of records"))


HF_PREFIX = "hf:"
_HF_FILE_TYPES = {".parquet": "parquet", ".arrow": "arrow"}


def is_hf_source(path: str | Path) -> bool:
    """A Hugging Face ``datasets`` source: ``hf:NAME[:SPLIT]``, a parquet / arrow file, or a ``save_to_disk`` folder."""
    text = str(path)
    p = Path(text)
    return text.startswith(HF_PREFIX) or p.suffix in _HF_FILE_TYPES or (p / "dataset_info.json").is_file() or \
        (p / "dataset_dict.json").is_file()


def iter_hf(source: str) -> Iterator[tuple[int, Any]]:
    """(index, record) of a Hugging Face dataset in the LLaVA format (columns id, image, conversations)."""
    import datasets

    p = Path(source)
    try:
        if source.startswith(HF_PREFIX):
            name, _, split = source[len(HF_PREFIX):].partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
        elif p.suffix in _HF_FILE_TYPES:
            if not p.is_file():
                raise DataError(f"{source}: data file does not exist")
            ds = datasets.load_dataset(_HF_FILE_TYPES[p.suffix], data_files=str(p), split="train")
        else:
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{source}: a dataset dict without a 'train' split (has {sorted(ds)})")
                ds = ds["train"]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (network, format, missing split)
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{source}: could not load the dataset ({type(e).__name__}: {first})") from None
    if "conversations" not in ds.column_names:
        raise DataError(f"{source}: the dataset has no 'conversations' column (columns: {ds.column_names})")
    image_feature = ds.features.get("image")
    if image_feature is not None and type(image_feature).__name__ == "Image":
        raise DataError(f"{source}: column 'image' holds embedded images; lora-llava reads image paths relative to "
                        "data.image_folder (save the images as files and store their paths)")
    yield from enumerate(ds)


def iter_raw(paths: Iterable[str | Path]) -> Iterator[tuple[str, int, Any]]:
    """(source, index, raw record) of LLaVA JSON / JSONL files and Hugging Face datasets, in order; not checked yet."""
    for path in paths:
        if is_hf_source(path):
            for index, record in iter_hf(str(path)):
                yield str(path), index, record
            continue
        path = Path(path)
        if path.is_dir():
            raise DataError(f"{path}: is a folder, not a data file (LLaVA JSON / JSONL, or a datasets save_to_disk "
                            "folder)")
        if not path.is_file():
            raise DataError(f"{path}: data file does not exist")
        for index, record in iter_file(path):
            yield str(path), index, record


def read_records(paths: Iterable[str | Path]) -> Iterator[Sample]:
    """Samples of one or more LLaVA JSON (a list) or JSONL (one record a line) files, in order."""
    for path, index, record in iter_raw(paths):
        yield sample_from_record(record, index, path)


def place_image(turns: list[tuple[str, str]], position: str, rng: random.Random | None = None) -> list[tuple[str, str]]:
    """Where the single ``<image>`` of the first question goes: ``first`` = ``<image>\\n`` + question (the reference
    moves it there), ``random`` = before or after the question at random (the LLaVA paper's augmentation). A question
    that is only the tag stays ``<image>``, with no newline, as in the reference.

    Samples with several images or whose tag is not in the first question are left as they are.
    """
    if not turns or sum(v.count(IMAGE_TAG) for _, v in turns) != 1 or IMAGE_TAG not in turns[0][1]:
        return turns
    role, value = turns[0]
    question = value.replace(IMAGE_TAG, "").strip()
    if not question:  # a bare "<image>": as the reference, no newline after it (its strip() removes it)
        return [(role, IMAGE_TAG), *turns[1:]]
    after = position == "random" and rng is not None and rng.random() < 0.5
    return [(role, f"{question}\n{IMAGE_TAG}" if after else f"{IMAGE_TAG}\n{question}"), *turns[1:]]
