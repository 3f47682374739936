"""The data path: records -> samples -> tokens + labels -> batches."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .collator import LlavaCollator
from .images import ImageError, load_image, resolve_image_path
from .sources import DataError, Sample, iter_raw, read_records, sample_from_record
from .templates import IMAGE_TAG, TEMPLATES, Template, get_template, register_template
from .tokenize import IGNORE_INDEX, SampleTooLong, encode_prompt, encode_sample

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TAG",
    "TEMPLATES",
    "DataError",
    "ImageError",
    "LlavaCollator",
    "LlavaDataset",
    "Sample",
    "Template",
    "encode_prompt",
    "encode_sample",
    "get_template",
    "load_image",
    "read_records",
    "register_template",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DataReport:
    """What happened to the records on the way to tokens."""

    total: int = 0
    kept: int = 0
    with_image: int = 0
    truncated: int = 0
    too_long: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.kept}/{self.total} samples kept ({self.with_image} with images); {self.truncated} truncated, "
                f"{self.too_long} dropped as too long, {len(self.skipped)} skipped as bad")
        if self.skipped:
            text += "; first: " + self.skipped[0]
        return text


class LlavaDataset:
    """Tokenized LLaVA samples, ready for :class:`LlavaCollator` and the trainer.

    Build with :meth:`from_files` (LLaVA JSON / JSONL) or :meth:`from_records` (Python dicts in the LLaVA format).
    ``on_bad_sample="skip"`` drops bad records and counts them in :attr:`report`; ``"error"`` raises on the first.
    """

    def __init__(self, samples: Iterable[Sample], tokenizer, template: str | Template, image_token_id: int,
                 num_image_tokens: int, max_length: int | None = None, image_folder: str | None = None,
                 on_bad_sample: str = "error"):
        self.template = get_template(template) if isinstance(template, str) else template
        self.image_folder = image_folder
        self.report = DataReport()
        self.samples: list[Sample] = []
        self.rows: list[dict[str, Any]] = []
        for sample in _guarded(samples, self.report, on_bad_sample):
            self.report.total += 1
            try:
                for rel in sample.images:
                    path = resolve_image_path(image_folder, rel)
                    if not path.is_file():
                        raise ImageError(f"image '{rel}' not found (looked at '{path}')")
                enc = encode_sample(sample, tokenizer, self.template, image_token_id, num_image_tokens, max_length)
            except SampleTooLong as e:
                self.report.too_long += 1
                logger.debug("dropped: %s", e)
                continue
            except (ImageError, ValueError) as e:
                msg = str(e) if sample.where in str(e) else f"{sample.where}: {e}"
                if on_bad_sample == "error":
                    raise DataError(msg) from None
                self.report.skipped.append(msg)
                continue
            self.report.kept += 1
            self.report.with_image += bool(sample.images)
            self.report.truncated += enc.truncated
            self.samples.append(sample)
            self.rows.append({"id": sample.id, "input_ids": enc.input_ids, "labels": enc.labels,
                              "image_files": list(sample.images), "length": len(enc.input_ids)})
        if not self.rows:
            raise DataError(f"no usable sample: {self.report.summary()}")

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], tokenizer, template: str | Template, **kwargs) -> LlavaDataset:
        """Read LLaVA JSON / JSONL files; see the class docstring for the keyword arguments."""
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
        """The rows as a ``datasets.Dataset`` (columns id, input_ids, labels, image_files, length)."""
        import datasets

        return datasets.Dataset.from_list(self.rows)


class _LazyRecord:
    """A record checked only when iterated, so ``on_bad_sample="skip"`` can count it."""

    def __init__(self, record: Any, index: int, path: str | None = None):
        self.record, self.index, self.path = record, index, path


def _guarded(samples: Iterable[Any], report: DataReport, on_bad_sample: str):
    for item in samples:
        if isinstance(item, _LazyRecord):
            try:
                item = sample_from_record(item.record, item.index, item.path)
            except DataError as e:
                if on_bad_sample == "error":
                    raise
                report.total += 1
                report.skipped.append(str(e))
                continue
        yield item
