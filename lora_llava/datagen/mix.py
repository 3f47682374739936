"""``lora-llava data mix``: a LLaVA-1.5-style mixture of instruction data and academic VQA data.

LLaVA-1.5 turned short-answer VQA sets into conversations by appending a response-format prompt to each question
("Answer the question using a single word or phrase."), and merged the QA pairs of one image into one conversation.
A spec names the sources; each is read, converted, deduplicated by (image, question) against itself and every
source above it, grouped by image, sampled (``ratio`` or ``count``, with a seed of its own) and the whole shuffled.
Same spec and seed, same output, byte for byte.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError, UsageError
from ..files import iter_jsonl, read_json, write_text_atomic

__all__ = ["FORMATS", "MixSpec", "MixTable", "SHORT_ANSWER", "SourceSpec", "build_mix", "load_mix_spec", "write_mix"]

SHORT_ANSWER = "Answer the question using a single word or phrase."
CAPTION = "Provide a one-sentence caption for the provided image."
IMAGE_TAG = "<image>"

FORMATS: dict[str, dict[str, Any]] = {
    # format: files it needs, default image path pattern, default response-format prompt
    "llava": {"files": ("path",), "image": None, "prompt": None},
    "vqav2": {"files": ("questions", "annotations"), "image": "coco/train2017/{image_id:012d}.jpg",
              "prompt": SHORT_ANSWER},
    "okvqa": {"files": ("questions", "annotations"), "image": "coco/train2017/{image_id:012d}.jpg",
              "prompt": SHORT_ANSWER},
    "gqa": {"files": ("path",), "image": "gqa/images/{imageId}.jpg", "prompt": SHORT_ANSWER},
    "ocrvqa": {"files": ("path",), "image": "ocr_vqa/images/{id}{ext}", "prompt": SHORT_ANSWER},
    "textcaps": {"files": ("path",), "image": "textvqa/train_images/{image_id}.jpg", "prompt": CAPTION},
    "qa": {"files": ("path",), "image": "{image}", "prompt": SHORT_ANSWER},
}
"""The source formats ``data mix`` reads."""

_SOURCE_KEYS = {"name", "format", "path", "questions", "annotations", "image", "prompt", "ratio", "count"}
_SPEC_KEYS = {"seed", "shuffle", "max_pairs", "image_folder", "sources"}


@dataclasses.dataclass
class SourceSpec:
    name: str
    format: str
    files: dict[str, Path]
    image: str | None
    """Image path pattern (``str.format`` with the record's fields)."""
    prompt: str | None
    ratio: float | None = None
    count: int | None = None


@dataclasses.dataclass
class MixSpec:
    sources: list[SourceSpec]
    seed: int = 0
    shuffle: bool = True
    max_pairs: int | None = None
    """At most this many QA pairs in one merged conversation (None: all pairs of an image in one)."""
    image_folder: Path | None = None
    """When given, records whose image is not under it are dropped (and counted)."""


def load_mix_spec(path: str | Path) -> MixSpec:
    """Read and check a mix spec; relative file paths are relative to the spec's folder. Every problem is named
    with its key (``sources[1].ratio``)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping with 'sources'")
    bad = set(raw) - _SPEC_KEYS
    if bad:
        raise UsageError(f"{path}: unknown key(s) {sorted(bad)}; valid: {sorted(_SPEC_KEYS)}")
    base = path.parent
    sources_raw = raw.get("sources")
    if not isinstance(sources_raw, list) or not sources_raw:
        raise UsageError(f"{path}: 'sources' must be a non-empty list")
    sources, names = [], set()
    for i, s in enumerate(sources_raw):
        where = f"{path}: sources[{i}]"
        if not isinstance(s, dict):
            raise UsageError(f"{where}: expected a mapping")
        bad = set(s) - _SOURCE_KEYS
        if bad:
            raise UsageError(f"{where}: unknown key(s) {sorted(bad)}; valid: {sorted(_SOURCE_KEYS)}")
        fmt = s.get("format")
        if fmt not in FORMATS:
            raise UsageError(f"{where}.format: {fmt!r}; expected one of {sorted(FORMATS)}")
        files = {}
        for key in FORMATS[fmt]["files"]:
            if not isinstance(s.get(key), str):
                raise UsageError(f"{where}.{key}: format {fmt} needs a file path here")
            p = Path(s[key]) if Path(s[key]).is_absolute() else base / s[key]
            if not p.is_file():
                raise UsageError(f"{where}.{key}: {p} not found")
            files[key] = p
        name = s.get("name") or files[FORMATS[fmt]["files"][0]].stem
        if name in names:
            raise UsageError(f"{where}.name: {name!r} is used twice; give each source its own name")
        names.add(name)
        ratio, count = s.get("ratio"), s.get("count")
        if ratio is not None and count is not None:
            raise UsageError(f"{where}: give 'ratio' or 'count', not both")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 0 < ratio <= 1):
            raise UsageError(f"{where}.ratio: {ratio!r}; expected a fraction in (0, 1]")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise UsageError(f"{where}.count: {count!r}; expected a whole number >= 0")
        prompt = s.get("prompt", FORMATS[fmt]["prompt"])
        if prompt is not None and not isinstance(prompt, str):
            raise UsageError(f"{where}.prompt: expected a string ('' for none)")
        image = s.get("image", FORMATS[fmt]["image"])
        if image is not None and not isinstance(image, str):
            raise UsageError(f"{where}.image: expected a path pattern such as 'coco/train2017/{{image_id:012d}}.jpg'")
        sources.append(SourceSpec(name, fmt, files, image, prompt or None, ratio, count))
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"{path}: seed: {seed!r}; expected an integer")
    max_pairs = raw.get("max_pairs")
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1):
        raise UsageError(f"{path}: max_pairs: {max_pairs!r}; expected a whole number >= 1")
    folder = raw.get("image_folder")
    if folder is not None:
        folder = Path(folder) if Path(folder).is_absolute() else base / folder
        if not folder.is_dir():
            raise UsageError(f"{path}: image_folder: {folder} is not a folder")
    return MixSpec(sources, seed, bool(raw.get("shuffle", True)), max_pairs, folder)


# ---- readers: every one yields (where, image, question, answer) or, for llava, (where, record) -------------------

def _image(src: SourceSpec, fields: dict, where: str) -> str:
    try:
        return src.image.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"{where}: image pattern {src.image!r} of source {src.name!r} cannot be filled from the "
                        f"record's fields {sorted(fields)} ({type(e).__name__}: {e})") from None


def _field(rec: Any, key: str, where: str, kind: type | tuple = str) -> Any:
    if not isinstance(rec, dict) or key not in rec:
        raise DataError(f"{where}: field {key!r} is missing")
    value = rec[key]
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: field {key!r} must be a non-empty {getattr(kind, '__name__', 'value')}")
    return value


def _majority(answers: Any, where: str) -> str:
    if not isinstance(answers, list) or not answers:
        raise DataError(f"{where}: needs 'multiple_choice_answer' or a non-empty 'answers' list")
    texts = [a.get("answer") if isinstance(a, dict) else a for a in answers]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"{where}: 'answers' holds no answer text")
    counts = collections.Counter(texts)
    return max(texts, key=lambda t: (counts[t], -texts.index(t)))


def _read_vqa(src: SourceSpec) -> Iterator[tuple[str, str, str, str]]:
    qpath, apath = src.files["questions"], src.files["annotations"]
    questions = read_json(qpath, dict, "a VQA questions object with 'questions'").get("questions")
    annotations = read_json(apath, dict, "a VQA annotations object with 'annotations'").get("annotations")
    if not isinstance(questions, list):
        raise DataError(f"{qpath}: field 'questions' must be a list")
    if not isinstance(annotations, list):
        raise DataError(f"{apath}: field 'annotations' must be a list")
    answers = {}
    for i, ann in enumerate(annotations):
        where = f"{apath}: annotations[{i}]"
        qid = _field(ann, "question_id", where, (int, str))
        mca = ann.get("multiple_choice_answer")
        answers[qid] = mca if isinstance(mca, str) and mca.strip() else _majority(ann.get("answers"), where)
    for i, q in enumerate(questions):
        where = f"{qpath}: questions[{i}]"
        qid = _field(q, "question_id", where, (int, str))
        if qid not in answers:
            raise DataError(f"{where}: question_id {qid!r} has no annotation in {apath}")
        _field(q, "image_id", where, (int, str))
        yield where, _image(src, q, where), _field(q, "question", where), answers[qid]


def _read_gqa(src: SourceSpec) -> Iterator[tuple[str, str, str, str]]:
    path = src.files["path"]
    data = read_json(path, dict, "a GQA questions object {question id: {imageId, question, answer}}")
    for qid, q in data.items():
        where = f"{path}: question {qid!r}"
        _field(q, "imageId", where)
        yield where, _image(src, {"qid": qid, **q}, where), _field(q, "question", where), _field(q, "answer", where)


def _read_ocrvqa(src: SourceSpec) -> Iterator[tuple[str, str, str, str]]:
    path = src.files["path"]
    data = read_json(path, dict, "an OCR-VQA dataset object {id: {imageURL, questions, answers}}")
    for key, rec in data.items():
        where = f"{path}: {key!r}"
        qs, ans = _field(rec, "questions", where, list), _field(rec, "answers", where, list)
        if len(qs) != len(ans):
            raise DataError(f"{where}: {len(qs)} questions but {len(ans)} answers")
        url = rec.get("imageURL") if isinstance(rec.get("imageURL"), str) else ""
        ext = Path(url).suffix or ".jpg"
        image = _image(src, {"id": key, "ext": ext, **rec}, where)
        for j, (q, a) in enumerate(zip(qs, ans)):
            if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()):
                raise DataError(f"{where}: questions[{j}] / answers[{j}] must be non-empty strings")
            yield f"{where}[{j}]", image, q, a


def _read_textcaps(src: SourceSpec) -> Iterator[tuple[str, str, str, str]]:
    path = src.files["path"]
    data = read_json(path, dict, "a TextCaps object with 'data'").get("data")
    if not isinstance(data, list):
        raise DataError(f"{path}: field 'data' must be a list")
    for i, rec in enumerate(data):
        where = f"{path}: data[{i}]"
        _field(rec, "image_id", where)
        # The prompt is the question: one caption per image survives the (image, question) deduplication.
        yield where, _image(src, rec, where), "", _field(rec, "caption_str", where)


def _read_qa(src: SourceSpec) -> Iterator[tuple[str, str, str, str]]:
    path = src.files["path"]
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"image", "question", "answer"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}: the header lacks column(s) {sorted(missing)} (needs image, question, "
                                "answer)")
            for row in reader:
                where = f"{path}: line {reader.line_num}"
                for key in ("image", "question", "answer"):
                    if not (row.get(key) or "").strip():
                        raise DataError(f"{where}: column {key!r} is empty")
                yield where, _image(src, row, where), row["question"], row["answer"]
        return
    for number, rec in iter_jsonl(path):
        where = f"{path}: line {number}"
        for key in ("image", "question", "answer"):
            _field(rec, key, where)
        yield where, _image(src, rec, where), rec["question"], rec["answer"]


_READERS = {"vqav2": _read_vqa, "okvqa": _read_vqa, "gqa": _read_gqa, "ocrvqa": _read_ocrvqa,
            "textcaps": _read_textcaps, "qa": _read_qa}


def _read_llava(src: SourceSpec) -> Iterator[tuple[str, dict]]:
    path = src.files["path"]
    records = ((n - 1, r) for n, r in iter_jsonl(path)) if path.suffix == ".jsonl" else \
        enumerate(read_json(path, list, "a JSON list of LLaVA records"))
    for index, rec in records:
        where = f"{path}: record {index}"
        convs = _field(rec, "conversations", where, list)
        for j, turn in enumerate(convs):
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") \
                    or not isinstance(turn.get("value"), str):
                raise DataError(f"{where}: conversations[{j}] must be {{'from': 'human'|'gpt', 'value': str}}")
        if not convs or convs[0]["from"] != "human":
            raise DataError(f"{where}: conversations must start with a human turn")
        if "image" in rec and not isinstance(rec["image"], str):
            raise DataError(f"{where}: field 'image' must be a path string (multi-image records are not mixed)")
        yield where, rec


# ---- the mix --------------------------------------------------------------------------------------------------

def _key(image: str | None, question: str, prompts: set[str]) -> tuple[str, str]:
    q = question.replace(IMAGE_TAG, " ")
    for p in prompts:
        q = q.replace(p, " ")
    return image or "", re.sub(r"\s+", " ", q).strip().casefold()


@dataclasses.dataclass
class SourceRow:
    name: str
    format: str
    read: int = 0
    """QA pairs (VQA formats) or records (llava) read."""
    duplicates: int = 0
    no_image: int = 0
    available: int = 0
    """Conversations after deduplication and merging."""
    taken: int = 0
    turns: int = 0
    """QA pairs in the conversations taken."""


@dataclasses.dataclass
class MixTable:
    rows: list[SourceRow]

    def format(self) -> str:
        total = sum(r.taken for r in self.rows) or 1
        head = ("source", "format", "read", "dup", "no image", "convs", "taken", "QA pairs", "share")
        lines = [(r.name, r.format, str(r.read), str(r.duplicates), str(r.no_image), str(r.available), str(r.taken),
                  str(r.turns), f"{100 * r.taken / total:.1f}%") for r in self.rows]
        lines.append(("total", "", str(sum(r.read for r in self.rows)), str(sum(r.duplicates for r in self.rows)),
                      str(sum(r.no_image for r in self.rows)), str(sum(r.available for r in self.rows)),
                      str(sum(r.taken for r in self.rows)), str(sum(r.turns for r in self.rows)), "100.0%"))
        widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        return "\n".join(fmt.format(*row) for row in [head, *lines])


def _sample(items: list, src: SourceSpec, seed: int) -> list:
    n = len(items)
    if src.count is not None:
        n = min(src.count, n)
    elif src.ratio is not None:
        n = round(src.ratio * n)
    if n >= len(items):
        return items
    rng = random.Random(f"{seed}:{src.name}")
    return [items[i] for i in sorted(rng.sample(range(len(items)), n))]


def build_mix(spec: MixSpec) -> tuple[list[dict], MixTable]:
    """The mixture's LLaVA records and the table of where they came from."""
    prompts = {s.prompt for s in spec.sources if s.prompt} | {SHORT_ANSWER, CAPTION}
    seen: set[tuple[str, str]] = set()
    out: list[dict] = []
    rows: list[SourceRow] = []
    ids: set[str] = set()
    for src in spec.sources:
        row = SourceRow(src.name, src.format)
        rows.append(row)

        def has_image(image: str | None, row: SourceRow = row) -> bool:
            if image and spec.image_folder is not None and not (spec.image_folder / image).is_file():
                row.no_image += 1
                return False
            return True

        units: list[dict] = []
        if src.format == "llava":
            for index, (_, rec) in enumerate(_read_llava(src)):
                row.read += 1
                image = rec.get("image")
                questions = [t["value"] for t in rec["conversations"] if t["from"] == "human"]
                key = _key(image, questions[0], prompts)
                if key in seen:
                    row.duplicates += 1
                    continue
                if not has_image(image):
                    continue
                seen.update(_key(image, q, prompts) for q in questions)
                rec = dict(rec)
                rec["id"] = str(rec.get("id", f"{src.name}-{index}"))
                units.append(rec)
        else:
            by_image: dict[str, list[tuple[str, str]]] = {}
            for _, image, question, answer in _READERS[src.format](src):
                row.read += 1
                key = _key(image, question, prompts)
                if key in seen:
                    row.duplicates += 1
                    continue
                if not has_image(image):
                    continue
                seen.add(key)
                by_image.setdefault(image, []).append((question.strip(), answer.strip()))
            for image, pairs in by_image.items():
                step = spec.max_pairs or len(pairs)
                for k in range(0, len(pairs), step):
                    conversations = []
                    for j, (q, a) in enumerate(pairs[k:k + step]):
                        text = "\n".join(t for t in (q, src.prompt) if t)
                        if j == 0:
                            text = f"{IMAGE_TAG}\n{text}"
                        conversations += [{"from": "human", "value": text}, {"from": "gpt", "value": a}]
                    units.append({"id": f"{src.name}-{Path(image).stem}-{k // step}", "image": image,
                                  "conversations": conversations})
        row.available = len(units)
        taken = _sample(units, src, spec.seed)
        for rec in taken:
            if rec["id"] in ids:
                rec["id"] = f"{src.name}-{rec['id']}"
            n = 2
            base = rec["id"]
            while rec["id"] in ids:
                rec["id"], n = f"{base}-{n}", n + 1
            ids.add(rec["id"])
        row.taken = len(taken)
        row.turns = sum(sum(t["from"] == "gpt" for t in r["conversations"]) for r in taken)
        out += taken
    if spec.shuffle:
        random.Random(spec.seed).shuffle(out)
    return out, MixTable(rows)


def write_mix(records: list[dict], out: str | Path) -> Path:
    """The mixture as one LLaVA JSON list, one record a line, written atomically."""
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    return write_text_atomic(out, f"[\n{body}\n]\n" if records else "[]\n")
