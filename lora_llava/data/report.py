"""The one report of what a dataset's records came to: kept, truncated, dropped as too long, and each problem."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..llava.constants import LLAVA15_IMAGE_TOKENS

__all__ = ["DataReport", "Problem"]


@dataclasses.dataclass
class Problem:
    """Why one record (or a whole file) cannot be used."""

    where: str
    """``file, record N`` (N 0-based, as in training's errors), the file alone when it cannot be read, or empty
    when ``reason`` names the record itself."""
    id: str | None
    reason: str

    def __str__(self) -> str:
        if not self.where:
            return self.reason
        return f"{self.where}{'' if self.id is None else f' (id {self.id!r})'}: {self.reason}"


@dataclasses.dataclass
class DataReport:
    """What happened to the records of a dataset on the way to tokens: counts, token lengths and every problem.

    Training (:class:`~lora_llava.data.LlavaDataset`, kept in a run folder as ``data_report.json``) and
    ``lora-llava data check`` (:meth:`format`) fill the same report.
    """

    files: int = 0
    records: int = 0
    with_image: int = 0
    """Well-formed records with images; the rest of :attr:`records` are text-only or malformed (bad JSON, schema)."""
    text_only: int = 0
    kept: int = 0
    truncated: int = 0
    too_long: int = 0
    too_long_samples: list[str] = dataclasses.field(default_factory=list)
    """Why the first :attr:`EXAMPLES` samples dropped as too long were (file, record, tokens, image tokens)."""
    image_tokens: list[int] = dataclasses.field(default_factory=list)
    """Image tokens of each record with images (all its images together), with an AnyRes grid (``data check``)."""
    lengths: list[int] = dataclasses.field(default_factory=list)
    """Token lengths before truncation of the records without problems (kept or dropped as too long)."""
    problems: list[Problem] = dataclasses.field(default_factory=list)
    warnings: list[Problem] = dataclasses.field(default_factory=list)
    """Records that train, but perhaps not as meant (a literal special-token string in a text)."""
    template: str = ""
    max_length: int | None = None
    num_image_tokens: int = LLAVA15_IMAGE_TOKENS
    grid: str = ""
    """The AnyRes grid the image tokens were counted with (``data check``), empty for a fixed count per image."""
    images_decoded: bool = True
    dump: Path | None = None
    cached: bool = False
    """The tokenized data came from the disk cache (training only)."""

    EXAMPLES = 20

    @property
    def ok(self) -> bool:
        """No bad record and at least one that would train (training stops on "no usable sample" otherwise)."""
        return not self.problems and self.kept > 0

    def percentiles(self) -> dict[str, int]:
        """p50, p90, p99 (nearest rank) and max of :attr:`lengths`; empty when there is none."""
        values = sorted(self.lengths)
        if not values:
            return {}
        out = {f"p{q}": values[max(0, math.ceil(q / 100 * len(values)) - 1)] for q in (50, 90, 99)}
        out["max"] = values[-1]
        return out

    def image_token_stats(self) -> dict[str, int]:
        """min, median, p95 (nearest rank) and max of :attr:`image_tokens`; empty when there is none."""
        values = sorted(self.image_tokens)
        if not values:
            return {}
        rank = lambda q: values[max(0, math.ceil(q / 100 * len(values)) - 1)]  # noqa: E731
        return {"min": values[0], "median": rank(50), "p95": rank(95), "max": values[-1]}

    def image_token_histogram(self, bins: int = 8, width: int = 40) -> list[str]:
        """:attr:`image_tokens` in ``bins`` equal ranges, one text bar a line."""
        values = self.image_tokens
        if not values:
            return []
        low, high = min(values), max(values)
        step = max(1, math.ceil((high - low + 1) / bins))
        counts = [0] * math.ceil((high - low + 1) / step)
        for v in values:
            counts[(v - low) // step] += 1
        top = max(counts)
        bar = lambda n: "#" * max(1 if n else 0, n * width // top)  # noqa: E731
        return [f"  {low + k * step:>6}-{low + (k + 1) * step - 1:<6} {n:>7}  {bar(n)}" for k, n in enumerate(counts)]

    def format(self, max_problems: int = 20) -> str:
        """A human-readable summary; the first ``max_problems`` problems are listed one a line."""
        malformed = self.records - self.with_image - self.text_only
        lines = [f"records: {self.records} in {self.files} file(s): {self.with_image} with image, "
                 f"{self.text_only} text-only" + (f", {malformed} malformed" if malformed else "")]
        stats = self.percentiles()
        per_image = "AnyRes image tokens" if self.grid else f"{self.num_image_tokens} tokens per image"
        if stats:
            lines.append(f"token lengths (template {self.template}, {per_image}, before truncation): "
                         + ", ".join(f"{k} {v}" for k, v in stats.items()))
        if self.grid:
            lines.append(f"image tokens per sample with images, {self.grid}: "
                         + (", ".join(f"{k} {v}" for k, v in self.image_token_stats().items()) or "none"))
            lines += self.image_token_histogram()
        limit = "no max_length" if self.max_length is None else f"max_length {self.max_length}"
        lines.append(f"{limit}: {self.truncated} truncated, {self.too_long} dropped as too long; "
                     f"{self.kept} records would train")
        if self.too_long_samples:
            lines.append("too long for max_length (dropped by training, never cut inside the image tokens):")
            lines += [f"  {t}" for t in self.too_long_samples[:max_problems]]
            if self.too_long > min(len(self.too_long_samples), max_problems):
                lines.append(f"  ... and {self.too_long - min(len(self.too_long_samples), max_problems)} more")
        if not self.images_decoded:
            lines.append("images: existence checked only (not decoded)")
        if self.warnings:
            lines.append(f"warnings: {len(self.warnings)}")
            lines += [f"  {p}" for p in self.warnings[:max_problems]]
            if len(self.warnings) > max_problems:
                lines.append(f"  ... and {len(self.warnings) - max_problems} more")
        lines.append(f"errors: {len(self.problems)}")
        lines += [f"  {p}" for p in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            lines.append(f"  ... and {len(self.problems) - max_problems} more")
        if self.kept == 0:
            lines.append("no record would train: training would stop with 'no usable sample'")
        if self.dump is not None:
            lines.append(f"dump: {self.kept} rows written to {self.dump}")
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line for training's log."""
        text = (f"{self.kept}/{self.records} samples kept ({self.with_image} with images); {self.truncated} truncated, "
                f"{self.too_long} dropped as too long, {len(self.problems)} skipped as bad")
        if self.problems:
            text += "; first: " + str(self.problems[0])
        if self.too_long_samples:
            text += "; first too long: " + self.too_long_samples[0]
        return text

    def to_json(self) -> dict:
        """What a run folder keeps as ``data_report.json``."""
        return {"records": self.records, "kept": self.kept, "with_image": self.with_image, "text_only": self.text_only,
                "truncated": self.truncated, "too_long": self.too_long, "cached": self.cached,
                "skipped": [str(p) for p in self.problems], "too_long_samples": self.too_long_samples}
