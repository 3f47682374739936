"""``LlavaDataset``: records checked once, text tokenized once (``datasets.map``, multi-process, cached on disk).

Records are validated in the main process (cheap: schema only). Tokenization runs as a ``datasets`` map whose result
is an Arrow file keyed by a fingerprint of everything that affects the tokens (records, tokenizer vocabulary,
template, max length, image tokens, image placement, lora-llava version): a second run over the same data reads the
cache instead of tokenizing again. Images are not opened here; the collator decodes them in DataLoader workers.
"""

from __future__ import annotations

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
from ..files import cache_root
from .images import resolve_image_path
from .report import DataReport, Problem
from .sources import Sample, iter_raw, place_image, sample_from_record
from .templates import Template, get_template
from .tokenize import SampleTooLong, encode_sample

logger = logging.getLogger(__name__)

__all__ = ["LlavaDataset", "default_cache_dir"]

_AUTO_PROC_MIN = 5000  # below this many samples, worker processes cost more than they save


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


def _encode_batch(batch: dict[str, list], tokenizer, template: Template, image_token_id: int, num_image_tokens: int,
                  max_length: int | None, image_folder: str | None, image_position: str, seed: int) -> dict[str, list]:
    """The ``datasets.map`` function: a batch of samples -> ids, labels, length, and a status per sample."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "has_image": [], "truncated": [],
                            "status": []}
    for i, sid in enumerate(batch["id"]):
        turns = list(zip(batch["roles"][i], batch["values"][i]))
        images, where = batch["image_files"][i], batch["where"][i]
        rng = random.Random(zlib.crc32(f"{seed}:{where}".encode())) if image_position == "random" else None
        sample = Sample(id=sid, turns=place_image(turns, image_position, rng), images=images, where=where)
        ids, labels, truncated, status = [], [], False, ""
        try:
            for rel in images:
                path = resolve_image_path(image_folder, rel)
                if not path.is_file():
                    raise ImageError(f"image '{rel}' not found (looked at '{path}')")
            enc = encode_sample(sample, tokenizer, template, image_token_id, num_image_tokens, max_length)
            ids, labels, truncated = enc.input_ids, enc.labels, enc.truncated
        except SampleTooLong as e:
            status = f"too_long:{e}"
        except (ImageError, ValueError) as e:
            status = "error:" + (str(e) if where in str(e) else f"{where}: {e}")
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
    h.update(json.dumps([__version__, type(tokenizer).__name__, vocab, template.name, template.system,
                         list(template.roles), template.stop, getattr(template.render_fn, "__qualname__", ""),
                         settings], sort_keys=True, default=str).encode())
    for s in samples:
        h.update(json.dumps([s.id, s.turns, s.images, s.where]).encode())
    return h.hexdigest()[:24]


class LlavaDataset:
    """Tokenized LLaVA samples, ready for :class:`LlavaCollator` and the trainer.

    Build with :meth:`from_files` (LLaVA JSON / JSONL, Hugging Face datasets) or :meth:`from_records` (Python dicts in
    the LLaVA format). ``on_bad_sample="skip"`` drops bad records and counts them in :attr:`report`; ``"error"``
    raises naming the first bad record. ``num_proc`` tokenizes in that many processes (None = automatic);
    ``cache_dir`` (None = :func:`default_cache_dir`, ``False`` = no disk cache) keeps the tokenized data across runs.
    ``image_position``: ``first`` (the reference: ``<image>\\n`` + question) or ``random`` (before or after).
    """

    def __init__(self, samples: Iterable[Sample], tokenizer, template: str | Template, image_token_id: int,
                 num_image_tokens: int, max_length: int | None = None, image_folder: str | None = None,
                 on_bad_sample: str = "error", num_proc: int | None = None, cache_dir: str | Path | bool | None = None,
                 image_position: str = "first", seed: int = 0):
        import datasets

        self.template = get_template(template) if isinstance(template, str) else template
        self.image_folder = image_folder
        self.report = DataReport()
        checked = _check_records(samples, self.report, on_bad_sample)
        self.report.records += len(checked)
        if not checked:
            raise DataError(f"no usable sample: {self.report.summary()}")
        raw = datasets.Dataset.from_dict({
            "id": [s.id for s in checked],
            "roles": [[r for r, _ in s.turns] for s in checked],
            "values": [[v for _, v in s.turns] for s in checked],
            "image_files": [list(s.images) for s in checked],
            "where": [s.where for s in checked],
        })
        settings = dict(image_token_id=image_token_id, num_image_tokens=num_image_tokens, max_length=max_length,
                        image_folder=str(image_folder) if image_folder is not None else None,
                        image_position=image_position, seed=seed)
        if num_proc is None:
            num_proc = min(os.cpu_count() or 1, 16) if len(checked) >= _AUTO_PROC_MIN else 1
        map_kwargs: dict[str, Any] = {}
        if cache_dir is not False:
            folder = Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()
            folder.mkdir(parents=True, exist_ok=True)
            cache_file = folder / f"{_fingerprint(checked, tokenizer, self.template, **settings)}.arrow"
            self.report.cached = cache_file.exists()
            map_kwargs = {"cache_file_name": str(cache_file), "load_from_cache_file": True}
        else:
            map_kwargs = {"keep_in_memory": True}
        if self.report.cached:
            logger.info("tokenized data read from the cache %s", map_kwargs["cache_file_name"])
        with _quiet_datasets(len(checked) < _AUTO_PROC_MIN):
            encoded = raw.map(
                _encode_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                fn_kwargs=dict(tokenizer=tokenizer, template=self.template, **settings),
                remove_columns=["roles", "values", "where"], desc="tokenizing", **map_kwargs,
            )
        statuses = encoded["status"]
        errors = [s[len("error:"):] for s in statuses if s.startswith("error:")]
        if errors and on_bad_sample == "error":
            raise DataError(errors[0])
        self.report.problems += [Problem("", None, e) for e in errors]
        self.report.too_long = sum(s.startswith("too_long:") for s in statuses)
        for s in statuses:
            if s.startswith("too_long:"):
                logger.debug("dropped: %s", s[len("too_long:"):])
        keep = [i for i, s in enumerate(statuses) if not s]
        self.rows = encoded.select(keep).remove_columns(["status"]) if len(keep) < len(encoded) else \
            encoded.remove_columns(["status"])
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
