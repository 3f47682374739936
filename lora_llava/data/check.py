"""``lora-llava data check``: every record of a dataset checked the way training reads it, every problem listed.

Training stops at the first bad record (or, with ``on_bad_sample: skip``, drops bad ones and tells little), usually
after the model has loaded. This goes through all records up front: the schema (:func:`sample_from_record`), the
images (under the image folder, present, decodable by the same guarded :func:`load_image` the collator uses), the
``<image>`` tags, and the token lengths from the same :func:`encode_sample` training calls, so "truncated" and
"dropped as too long" mean exactly what training would do with these records.

With an AnyRes grid (LLaVA-NeXT / LLaVA-1.5-HD) each image's token count comes from its size, as in training: the
report then gives the distribution of image tokens per sample and names the samples that no longer fit max_length.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import DataError, ImageError, UsageError
from ..files import BadLine, iter_jsonl, write_atomic
from ..llava.anyres import AnyresGrid
from ..llava.constants import LLAVA15_IMAGE_TOKENS, SPECIAL_TEXTS
from ..llava.tokenizer import image_token_id as tokenizer_image_token_id
from ..llava.tokenizer import load_tokenizer
from .images import image_header, load_image, resolve_image_path
from .report import DataReport, Problem
from .sources import Sample, is_hf_source, iter_file, iter_hf, place_image, sample_from_record
from .templates import Template, get_template
from .tokenize import SampleTooLong, encode_sample

__all__ = ["check_data"]

_BATCH = 512
"""Records read, and their images sent to the worker pool, at a time: bounds what is in flight."""


def _strip_where(message: str, where: str) -> str:
    return message[len(where) + 2:] if message.startswith(where + ": ") else message


@dataclasses.dataclass
class _Entry:
    """One record on its way through the check: its sample (None if unreadable) and what is wrong with it."""

    where: str
    id: str | None
    sample: Sample | None
    reasons: list[str]


def _iter_items(paths: Iterable[Path]) -> Iterator[tuple[str, int, Any] | _Entry | Problem]:
    """(file, index, raw record) of every file; an _Entry for a line that is not JSON, a Problem for such a file."""
    for path in paths:
        if is_hf_source(path):
            try:
                records = list(iter_hf(str(path)))
            except DataError as e:
                yield Problem(str(path), None, _strip_where(str(e), str(path)))
                continue
            for index, record in records:
                yield str(path), index, record
            continue
        if path.suffix == ".jsonl":
            # Training stops at the first line that is not JSON; a check goes on to the next.
            try:
                for number, record in iter_jsonl(path, strict=False):
                    if isinstance(record, BadLine):
                        yield _Entry(f"{path}, record {number - 1}", None, None, [record.message])
                    else:
                        yield str(path), number - 1, record
            except DataError as e:
                yield Problem(str(path), None, _strip_where(str(e), str(path)))
            continue
        try:
            records = list(iter_file(path))
        except (DataError, OSError, UnicodeDecodeError) as e:
            # A JSON list that does not parse has no records to go on with; the message names line and column.
            yield Problem(str(path), None, _strip_where(str(e), str(path)))
            continue
        for index, record in records:
            yield str(path), index, record


def _ignore_sigint() -> None:
    # Ctrl-C goes to the whole process group: the main process stops the pool, workers must not print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _image_problems(job: tuple[str | None, list[str], bool, bool]) -> tuple[list[str], list[tuple[int, int] | None]]:
    """Problems of one record's images, and each image's (height, width) (None when unknown); module level, so a
    process pool can run it. Without ``decode``, only existence is checked, or the header read when ``sizes`` are
    needed (an AnyRes grid)."""
    folder, images, decode, need_size = job
    problems, sizes = [], []
    for rel in images:
        try:
            if decode:
                image = load_image(folder, rel, aspect="resize")  # no padding: only whether it decodes matters here
                sizes.append((image.height, image.width))
            elif need_size:
                sizes.append(image_header(folder, rel)[1])
            else:
                path = resolve_image_path(folder, rel)
                if not path.is_file():
                    raise ImageError(f"image '{rel}' not found (looked at '{path}')")
                sizes.append(None)
        except ImageError as e:
            problems.append(str(e))
            sizes.append(None)
    return problems, sizes


def _special_texts(sample: Sample, entry: _Entry) -> list[Problem]:
    """A warning for each text that holds a string the tokenizer reads as a special token, saying what it becomes."""
    out = []
    for j, (_, value) in enumerate(sample.turns):
        for text, meaning in SPECIAL_TEXTS.items():
            if text in value:
                out.append(Problem(entry.where, entry.id, f"conversations[{j}].value contains '{text}', which becomes "
                                                          f"{meaning}, as in the LLaVA reference"))
    return out


def _parse(item: tuple[str, int, Any]) -> _Entry:
    path, index, record = item
    where = f"{path}, record {index}"
    rid = str(record["id"]) if isinstance(record, dict) and "id" in record else None
    try:
        return _Entry(where, rid, sample_from_record(record, index, path), [])
    except DataError as e:
        return _Entry(where, rid, None, [_strip_where(str(e), where)])


def check_data(paths: Iterable[str | Path], image_folder: str | Path | None, template: str | Template = "vicuna_v1",
               tokenizer=None, max_length: int | None = 2048, num_image_tokens: int = LLAVA15_IMAGE_TOKENS,
               dump: str | Path | None = None, decode_images: bool = True, workers: int = 1,
               progress: bool | None = False, grid: AnyresGrid | None = None) -> DataReport:
    """Check every record of LLaVA JSON / JSONL files and return a :class:`DataReport`; never stops at a bad one.

    ``tokenizer``: a tokenizer that has ``<image>`` (see :func:`load_tokenizer`), a local folder, or None for the
    shipped Vicuna one. ``dump``: a JSONL file that gets ``{"id", "input_ids", "labels"}`` of every record that
    would train, exactly as training sees it; written to a temporary file beside it and renamed at the end, so an
    exception or Ctrl-C leaves no partial file. ``decode_images=False`` only checks that the images exist;
    ``workers > 1`` decodes them in that many processes. ``progress``: show a bar (None: only on a terminal).
    ``grid``: the model's AnyRes grid; each image then counts the grid's tokens for its size instead of
    ``num_image_tokens``, and the report holds each sample's image tokens (:attr:`DataReport.image_tokens`).
    Raises :class:`UsageError` when the check cannot run as asked.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise UsageError("no data file given")
    for p in paths:
        if not p.is_file() and not is_hf_source(str(p)):
            raise UsageError(f"data file '{p}' does not exist")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise UsageError(f"image folder '{image_folder}' is not a folder")
    if dump is not None and not Path(dump).parent.is_dir():
        raise UsageError(f"dump file '{dump}': folder '{Path(dump).parent}' does not exist")
    if dump is not None and Path(dump).is_dir():
        raise UsageError(f"--dump '{dump}' is a folder; give a file name (e.g. '{Path(dump) / 'dump.jsonl'}')")
    if dump is not None and not os.access(Path(dump).parent, os.W_OK | os.X_OK):
        raise UsageError(f"--dump '{dump}': folder '{Path(dump).parent}' cannot be written")
    if workers < 1 or num_image_tokens < 1 or (max_length is not None and max_length < 1):
        raise UsageError("workers, num_image_tokens and max_length must be at least 1")
    try:
        tmpl = get_template(template) if isinstance(template, str) else template
    except ValueError as e:
        raise UsageError(str(e)) from None
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    image_token_id = tokenizer_image_token_id(tokenizer)

    report = DataReport(files=len(paths), template=tmpl.name, max_length=max_length,
                         num_image_tokens=num_image_tokens, images_decoded=decode_images,
                         grid=_describe(grid) if grid is not None else "")
    # Counting records needs the files parsed; iter_file holds a whole JSON file in memory anyway.
    items = list(_iter_items(paths))
    folder = None if image_folder is None else str(image_folder)
    pool = None
    bar = tqdm(total=len(items), desc="checking", unit="record", dynamic_ncols=True,
               disable=None if progress is None else not progress)

    def check(out) -> None:
        for start in range(0, len(items), _BATCH):
            batch = items[start:start + _BATCH]
            entries = [item if isinstance(item, (_Entry, Problem)) else _parse(item) for item in batch]
            jobs = [(folder, e.sample.images, decode_images, grid is not None) for e in entries
                    if isinstance(e, _Entry) and e.sample is not None and e.sample.images]
            if pool is not None:
                results = iter(pool.map(_image_problems, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
            else:
                results = map(_image_problems, jobs)  # lazy: the bar moves record by record
            for entry in entries:
                bar.update(1)
                if isinstance(entry, Problem):  # a whole file: no record of it to count
                    report.problems.append(entry)
                    continue
                report.records += 1
                sample = entry.sample
                if sample is not None:
                    report.with_image += bool(sample.images)
                    report.text_only += not sample.images
                    counts: int | list[int] = num_image_tokens
                    if sample.images:
                        problems, sizes = next(results)
                        entry.reasons += problems
                        if grid is not None:
                            # An unreadable image counts 0: the record is reported bad and never reaches a length.
                            counts = [grid.tokens(*s) if s is not None else 0 for s in sizes]
                    row = _encode(sample, entry, tokenizer, tmpl, image_token_id, counts, max_length, report,
                                  grid is not None)
                    if row is not None and out is not None:
                        out.write(json.dumps(row, separators=(",", ":")) + "\n")
                if entry.reasons:
                    report.problems.append(Problem(entry.where, entry.id, "; ".join(entry.reasons)))
                elif sample is not None:
                    report.warnings += _special_texts(sample, entry)

    def check_into(tmp: Path) -> None:
        try:
            out = tmp.open("w", encoding="utf-8")
        except OSError as e:
            raise UsageError(f"cannot write the dump beside '{dump}' ({e})") from None
        with out:
            check(out)

    try:
        if workers > 1:
            import multiprocessing

            # spawn, not fork: the tokenizer's threads and torch are already loaded in this process.
            pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_sigint)
        if dump is None:
            check(None)
        else:
            # Written beside the dump and renamed at the end: an error or Ctrl-C leaves no partial file.
            report.dump = write_atomic(dump, check_into)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return report


def _describe(grid: AnyresGrid) -> str:
    pins = ", ".join(f"{h}x{w}" for h, w in grid.pinpoints)
    return (f"AnyRes grid of {grid.tile} px tiles ({pins}; up to {grid.max_tiles} tiles + the base view, "
            f"at most {grid.worst_case} image tokens per image)")


def _encode(sample: Sample, entry: _Entry, tokenizer, template: Template, image_token_id: int,
            num_image_tokens: int | list[int], max_length: int | None, report: DataReport,
            anyres: bool = False) -> dict[str, Any] | None:
    """Tokenize as training does and count the outcome; the dump row when the record would train, else None."""
    # Training's default data.image_position (first): the image of the first question goes to its front.
    sample = dataclasses.replace(sample, turns=place_image(sample.turns, "first"))
    try:
        full = encode_sample(sample, tokenizer, template, image_token_id, num_image_tokens)
    except ValueError as e:
        entry.reasons.append(_strip_where(str(e), sample.where))
        return None
    if entry.reasons:
        return None  # a bad image: training skips or stops on it before its length matters
    report.lengths.append(len(full.input_ids))
    image_tokens = sum(num_image_tokens) if isinstance(num_image_tokens, list) else 0
    if anyres and sample.images:
        report.image_tokens.append(image_tokens)
    enc = full
    if max_length is not None and len(full.input_ids) > max_length:
        # Only over-long samples are tokenized twice; encode_sample alone decides cut or drop, as in training.
        try:
            enc = encode_sample(sample, tokenizer, template, image_token_id, num_image_tokens, max_length)
        except SampleTooLong:
            report.too_long += 1
            if len(report.too_long_samples) < report.EXAMPLES:
                report.too_long_samples.append(
                    f"{sample.where}{'' if sample.id is None else f' (id {sample.id!r})'}: {len(full.input_ids)} "
                    f"tokens" + (f", {image_tokens} of them image tokens" if anyres and sample.images else ""))
            return None
    report.kept += 1
    report.truncated += enc.truncated
    return {"id": sample.id, "input_ids": enc.input_ids, "labels": enc.labels}
