"""``LlavaDataset``: records checked once, text tokenized once (``datasets.map``, multi-process, cached on disk).

Records are validated in the main process (cheap: schema only). Tokenization runs as a ``datasets`` map whose result
is an Arrow file keyed by a fingerprint of everything that affects the tokens (records, tokenizer vocabulary,
template, max length, image tokens, image placement, lora-llava version): a second run over the same data reads the
cache instead of tokenizing again. The cache holds no verdict about images: on every run the images of the samples
that would train are checked again (existence and header, cheap), and decoded once per set of unchanged files (the
verdicts are kept beside the tokenized data, keyed by the files' paths, sizes and times), so a missing, replaced or
undecodable image is skipped or refused before training, never met mid-run. The collator decodes them for training
in DataLoader workers.

With an AnyRes grid (LLaVA-NeXT / LLaVA-1.5-HD, :class:`~lora_llava.llava.anyres.AnyresGrid`) an image's token count
depends on its size. The sizes are read from the image headers (no decode) in the main process before tokenizing, go
into the rows (``image_sizes``) and into the fingerprint (with the grid), so a replaced image of another size
re-tokenizes instead of reading stale counts from the cache; each row keeps its per-image counts (``image_tokens``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError, ImageError
from ..files import cache_root, read_json, write_text_atomic
from ..llava.anyres import AnyresGrid
from .images import image_header, load_image
from .report import DataReport, Problem
from .sources import Sample, iter_raw, place_image, sample_from_record
from .templates import Template, get_template
from .tokenize import SampleTooLong, encode_sample

logger = logging.getLogger(__name__)

__all__ = ["LlavaDataset", "default_cache_dir"]

_AUTO_PROC_MIN = 5000  # below this many samples, worker processes cost more than they save
_CACHE_FORMAT = 3  # 3: rows keep 'image_tokens' (+ 'image_sizes' with a grid); 2: rows keep 'where', no image checks


def default_cache_dir() -> Path:
    """``$LORA_LLAVA_CACHE/tokenized`` (default ``~/.cache/lora_llava/tokenized``)."""
    return cache_root() / "tokenized"


class _LazyRecord:
    """A record checked only when iterated, so ``on_bad_sample="skip"`` can count it."""

    def __init__(self, record: Any, index: int, path: str | None = None):
        self.record, self.index, self.path = record, index, path


def _check_records(samples: Iterable[Any], report: DataReport, on_bad_sample: str) -> list[Sample]:
    out = []
    for item in samples:
        if isinstance(item, _LazyRecord):
            try:
                item = sample_from_record(item.record, item.index, item.path)
            except DataError as e:
                if on_bad_sample == "error":
                    raise
                report.records += 1
                report.problems.append(Problem("", None, str(e)))
                continue
        out.append(item)
    return out


def _image_counts(images: list[str], sizes: list[list[int]] | None, grid: AnyresGrid | None,
                  num_image_tokens: int) -> list[int]:
    """Image tokens of each image of a sample: ``num_image_tokens`` each without a grid, the grid's count of each
    image's size with one (a size of ``[0, 0]`` is an image whose header could not be read)."""
    if grid is None:
        return [num_image_tokens] * len(images)
    return [grid.tokens(h, w) if h > 0 else 0 for h, w in sizes]


def _encode_batch(batch: dict[str, list], tokenizer, template: Template, image_token_id: int, num_image_tokens: int,
                  max_length: int | None, image_folder: str | None, image_position: str, seed: int,
                  grid: AnyresGrid | None = None, image_problems: dict[str, str] | None = None) -> dict[str, list]:
    """The ``datasets.map`` function: a batch of samples -> ids, labels, length, image tokens per image, and a status
    per sample."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "has_image": [], "truncated": [],
                            "image_tokens": [], "status": []}
    for i, sid in enumerate(batch["id"]):
        turns = list(zip(batch["roles"][i], batch["values"][i]))
        images, where = batch["image_files"][i], batch["where"][i]
        rng = random.Random(zlib.crc32(f"{seed}:{where}".encode())) if image_position == "random" else None
        sample = Sample(id=sid, turns=place_image(turns, image_position, rng), images=images, where=where)
        ids, labels, truncated, status = [], [], False, ""
        counts = _image_counts(images, batch["image_sizes"][i] if grid is not None else None, grid, num_image_tokens)
        unread = next((f for f in images if image_problems and f in image_problems), None)
        try:
            if unread is not None:
                # No size, no token count: the image's own problem is the sample's (skipped or refused as any bad one).
                raise ImageError(image_problems[unread])
            enc = encode_sample(sample, tokenizer, template, image_token_id, counts, max_length)
            ids, labels, truncated = enc.input_ids, enc.labels, enc.truncated
        except SampleTooLong as e:
            status = f"too_long:{e}"
            if grid is not None and images:
                status += f" ({sum(counts)} of them image tokens: {' + '.join(map(str, counts))})"
        except (ImageError, ValueError) as e:
            status = "error:" + (str(e) if where in str(e) else f"{where}: {e}")
        out["image_tokens"].append(counts)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["has_image"].append(bool(images))
        out["truncated"].append(truncated)
        out["status"].append(status)
    return out


def _fingerprint(samples: list[Sample], tokenizer, template: Template, **settings: Any) -> str:
    from .. import __version__

    h = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps([__version__, _CACHE_FORMAT, type(tokenizer).__name__, vocab, template.name, template.system,
                         list(template.roles), template.stop, getattr(template.render_fn, "__qualname__", ""),
                         settings], sort_keys=True, default=str).encode())
    for s in samples:
        h.update(json.dumps([s.id, s.turns, s.images, s.where]).encode())
    return h.hexdigest()[:24]


def _decode_problem(job: tuple[str | None, str]) -> str | None:
    """Why one image cannot be decoded, or None (module level, so a process pool can run it)."""
    folder, relative = job
    try:
        load_image(folder, relative, aspect="resize")  # no padding: only whether it decodes matters here
    except ImageError as e:
        return str(e)
    return None


def _probe(files: Iterable[str], image_folder: str | None) -> tuple[dict[str, list[int]], dict[str, tuple[int, int]],
                                                                      dict[str, str]]:
    """Headers of ``files`` (nothing decoded): ``{image: [bytes, mtime, inode]}``, ``{image: (height, width)}`` and
    ``{image: problem}`` for those that cannot be read."""
    stats: dict[str, list[int]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    problems: dict[str, str] = {}
    for rel in sorted(set(files)):
        try:
            st, size = image_header(image_folder, rel)
        except ImageError as e:
            problems[rel] = str(e)
            continue
        stats[rel] = [st.st_size, st.st_mtime_ns, st.st_ino]
        sizes[rel] = size
    return stats, sizes, problems


def _image_problems(files: set[str], image_folder: str | None, cache_folder: Path | None,
                    num_proc: int, probed: tuple[dict, dict, dict] | None = None) -> dict[str, str]:
    """``{image: problem}`` of ``files``, found again on every run: each image's existence and header (cheap, every
    time; ``probed``: this run's :func:`_probe`, when already called), and a full decode, whose verdicts are kept in
    ``cache_folder`` for exactly these files (path, size, modification time): unchanged images are not decoded twice,
    a changed one is."""
    if probed is None:
        probed = _probe(files, image_folder)
    stats = {rel: probed[0][rel] for rel in sorted(files) if rel in probed[0]}
    problems = {rel: probed[2][rel] for rel in files if rel in probed[2]}
    if not stats:
        return problems
    key = hashlib.sha256(json.dumps([_CACHE_FORMAT, str(image_folder), sorted(stats.items())]).encode()).hexdigest()
    verdicts = cache_folder / f"images-{key[:24]}.json" if cache_folder is not None else None
    decoded = None
    if verdicts is not None and verdicts.is_file():
        try:
            decoded = read_json(verdicts, dict)
        except DataError:
            decoded = None  # a damaged verdict file: decode again
    if decoded is None:
        jobs = [(image_folder, rel) for rel in stats]
        if num_proc > 1 and len(jobs) >= _AUTO_PROC_MIN:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(num_proc) as pool:
                results = list(pool.map(_decode_problem, jobs, chunksize=256))
        else:
            results = [_decode_problem(job) for job in jobs]
        decoded = {rel: problem for (_, rel), problem in zip(jobs, results) if problem}
        if verdicts is not None:
            write_text_atomic(verdicts, json.dumps(decoded))
    problems.update(decoded)
    return problems


class LlavaDataset:
    """Tokenized LLaVA samples, ready for :class:`LlavaCollator` and the trainer.

    Build with :meth:`from_files` (LLaVA JSON / JSONL, Hugging Face datasets) or :meth:`from_records` (Python dicts in
    the LLaVA format). ``on_bad_sample="skip"`` drops bad records and counts them in :attr:`report`; ``"error"``
    raises naming the first bad record. ``num_proc`` tokenizes in that many processes (None = automatic);
    ``cache_dir`` (None = :func:`default_cache_dir`, ``False`` = no disk cache) keeps the tokenized data across runs.
    ``image_position``: ``first`` (the reference: ``<image>\\n`` + question) or ``random`` (before or after).
    ``grid``: the model's AnyRes grid (:meth:`AnyresGrid.from_config`; None for LLaVA-1.5): each image then takes the
    grid's count for its size (read from its header) instead of ``num_image_tokens``; a sample whose image tokens do
    not fit ``max_length`` is too long (never cut).
    """

    def __init__(self, samples: Iterable[Sample], tokenizer, template: str | Template, image_token_id: int,
                 num_image_tokens: int, max_length: int | None = None, image_folder: str | None = None,
                 on_bad_sample: str = "error", num_proc: int | None = None, cache_dir: str | Path | bool | None = None,
                 image_position: str = "first", seed: int = 0, grid: AnyresGrid | None = None):
        import datasets

        self.template = get_template(template) if isinstance(template, str) else template
        self.image_folder = image_folder
        self.report = DataReport()
        checked = _check_records(samples, self.report, on_bad_sample)
        self.report.records += len(checked)
        if not checked:
            raise DataError(f"no usable sample: {self.report.summary()}")
        self.grid = grid
        columns = {
            "id": [s.id for s in checked],
            "roles": [[r for r, _ in s.turns] for s in checked],
            "values": [[v for _, v in s.turns] for s in checked],
            "image_files": [list(s.images) for s in checked],
            "where": [s.where for s in checked],
        }
        folder_text = str(image_folder) if image_folder is not None else None
        probed = None
        extra: dict[str, Any] = {}
        if grid is not None:
            # Token counts need every image's size before tokenizing: the headers are read once, here (the image
            # check below reuses them). An unreadable image gets size [0, 0] and its problem as the sample's status.
            probed = _probe((f for s in checked for f in s.images), folder_text)
            columns["image_sizes"] = [[list(probed[1].get(f, (0, 0))) for f in s.images] for s in checked]
            extra = dict(grid=grid, image_problems=probed[2])
        raw = datasets.Dataset.from_dict(columns)
        settings = dict(image_token_id=image_token_id, num_image_tokens=num_image_tokens, max_length=max_length,
                        image_folder=folder_text, image_position=image_position, seed=seed)
        if num_proc is None:
            num_proc = min(os.cpu_count() or 1, 16) if len(checked) >= _AUTO_PROC_MIN else 1
        map_kwargs: dict[str, Any] = {}
        folder = None
        if cache_dir is not False:
            folder = Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()
            folder.mkdir(parents=True, exist_ok=True)
            # With a grid, the grid and every image's size are part of the key: the counts depend on them.
            keyed = dict(settings, grid=dataclasses.asdict(grid), sizes=columns["image_sizes"],
                         problems=sorted(probed[2].items())) if grid is not None else settings
            cache_file = folder / f"{_fingerprint(checked, tokenizer, self.template, **keyed)}.arrow"
            self.report.cached = cache_file.exists()
            map_kwargs = {"cache_file_name": str(cache_file), "load_from_cache_file": True}
        else:
            map_kwargs = {"keep_in_memory": True}
        if self.report.cached:
            logger.info("tokenized data read from the cache %s", map_kwargs["cache_file_name"])
        with _quiet_datasets(len(checked) < _AUTO_PROC_MIN):
            encoded = raw.map(
                _encode_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                fn_kwargs=dict(tokenizer=tokenizer, template=self.template, **settings, **extra),
                remove_columns=["roles", "values"], desc="tokenizing", **map_kwargs,
            )
        statuses = list(encoded["status"])
        files = {f for status, images in zip(statuses, encoded["image_files"]) if not status for f in images}
        bad = _image_problems(files, folder_text, folder, num_proc, probed) if files else {}
        if bad:
            for i, (where, images) in enumerate(zip(encoded["where"], encoded["image_files"])):
                hit = next((f for f in images if f in bad), None) if not statuses[i] else None
                if hit is not None:
                    statuses[i] = f"error:{where}: {bad[hit]}"
        errors = [s[len("error:"):] for s in statuses if s.startswith("error:")]
        if errors and on_bad_sample == "error":
            raise DataError(errors[0])
        self.report.problems += [Problem("", None, e) for e in errors]
        self.report.too_long = sum(s.startswith("too_long:") for s in statuses)
        for s in statuses:
            if s.startswith("too_long:"):
                logger.debug("dropped: %s", s[len("too_long:"):])
                if len(self.report.too_long_samples) < self.report.EXAMPLES:
                    self.report.too_long_samples.append(s[len("too_long:"):])
        keep = [i for i, s in enumerate(statuses) if not s]
        self.rows = encoded.select(keep).remove_columns(["status", "where"]) if len(keep) < len(encoded) else \
            encoded.remove_columns(["status", "where"])
        self.report.kept = len(keep)
        self.report.with_image = sum(self.rows["has_image"]) if keep else 0
        self.report.text_only = self.report.kept - self.report.with_image
        self.report.truncated = sum(self.rows["truncated"]) if keep else 0
        if not keep:
            raise DataError(f"no usable sample: {self.report.summary()}")

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], tokenizer, template: str | Template, **kwargs) -> LlavaDataset:
        """Read LLaVA JSON / JSONL files or Hugging Face datasets; see the class docstring for keyword arguments."""
        lazy = (_LazyRecord(record, index, path) for path, index, record in iter_raw(paths))
        return cls(lazy, tokenizer, template, **kwargs)

    @classmethod
    def from_records(cls, records: Iterable[dict], tokenizer, template: str | Template, **kwargs) -> LlavaDataset:
        """Python records in the LLaVA format: ``{"id", "image", "conversations": [{"from", "value"}, ...]}``."""
        return cls((_LazyRecord(r, i) for i, r in enumerate(records)), tokenizer, template, **kwargs)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def to_hf(self):
        """The rows as a ``datasets.Dataset`` (columns id, input_ids, labels, image_files, length, has_image, ...)."""
        return self.rows


class _quiet_datasets:
    """Hide datasets' own progress bar for small data (tests, the demo); keep it where tokenizing takes a while."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self):
        import datasets

        self.was = datasets.utils.logging.is_progress_bar_enabled()
        if self.quiet:
            datasets.utils.logging.disable_progress_bar()

    def __exit__(self, *exc):
        import datasets

        if self.was:
            datasets.utils.logging.enable_progress_bar()
