"""Batches for the trainer: images decoded here (so in DataLoader workers), text already tokenized.

With an AnyRes grid (LLaVA-NeXT / LLaVA-1.5-HD) the image goes to the model's ``LlavaNextImageProcessor`` as it is
(no pad-to-square: the processor resizes it into its grid resolution and pads that itself, and squashes a copy to
the tile size for the base view), which returns ``pixel_values`` of shape ``(images, tiles + 1, 3, tile, tile)``,
zero-padded to the batch's largest tile count, and ``image_sizes`` ``(height, width)`` per image, from which the model
knows how many of each image's tiles are real.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import DataError
from ..llava.anyres import AnyresGrid
from ..llava.constants import CLIP_MEAN, IGNORE_INDEX
from .images import load_image

__all__ = ["LlavaCollator"]


@dataclasses.dataclass
class LlavaCollator:
    """Turns encoded samples (``input_ids``, ``labels``, ``image_files``) into a model batch.

    Right-padded by default (pad id, labels -100, attention mask). With ``padding_free`` the batch is one row: the
    samples concatenated, ``position_ids`` restarting at 0 for each, no attention mask; flash-attn's varlen kernel
    (and, on the CPU, transformers' sdpa with ``use_cache=False``) keeps the samples from attending to each other.

    ``grid``: the model's AnyRes grid; the batch then carries ``image_sizes`` too, images are never padded to a square
    (``image_aspect_ratio`` does not apply), and each image's size is checked against the size its tokens were counted
    for (a row's ``image_sizes``), so a replaced image is an error naming it, not a shape mismatch inside the model.
    """

    image_processor: Any
    pad_token_id: int
    image_folder: str | None = None
    image_aspect_ratio: str = "pad"
    padding_free: bool = False
    pad_to_multiple_of: int | None = None
    grid: AnyresGrid | None = None

    def __post_init__(self):
        if self.grid is not None:
            pins = getattr(self.image_processor, "image_grid_pinpoints", None)
            if pins is None or [list(p) for p in pins] != [list(p) for p in self.grid.pinpoints]:
                raise ValueError(f"the image processor's grid resolutions {pins} are not the model's "
                                 f"{[list(p) for p in self.grid.pinpoints]}: image tokens and features would disagree")

    def _images(self, features: list[dict]) -> dict[str, torch.Tensor]:
        files = [f for feat in features for f in (feat.get("image_files") or [])]
        if not files:
            return {}
        if self.grid is None:
            mean = tuple(getattr(self.image_processor, "image_mean", None) or CLIP_MEAN)
            images = [load_image(self.image_folder, f, self.image_aspect_ratio, mean) for f in files]
            return {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}
        images = [load_image(self.image_folder, f, aspect="resize") for f in files]  # "resize": as it is, no pad
        counted = [tuple(s) for feat in features for s in (feat.get("image_sizes") or [])]
        for k, (f, image) in enumerate(zip(files, images)):
            if k < len(counted) and counted[k] != (image.height, image.width):
                raise DataError(f"image '{f}' is {image.height}x{image.width} (height x width) now, but its image "
                                f"tokens were counted for {counted[k][0]}x{counted[k][1]}: it changed after "
                                "tokenization; run again to re-tokenize")
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        if self.padding_free:
            ids = [t for f in features for t in f["input_ids"]]
            labels = []
            for f in features:
                # The first token of each sample is never a target of the previous one.
                lab = list(f["labels"])
                lab[0] = IGNORE_INDEX
                labels += lab
            positions = [p for f in features for p in range(len(f["input_ids"]))]
            batch["input_ids"] = torch.tensor([ids], dtype=torch.long)
            batch["labels"] = torch.tensor([labels], dtype=torch.long)
            batch["position_ids"] = torch.tensor([positions], dtype=torch.long)
        else:
            longest = max(len(f["input_ids"]) for f in features)
            if self.pad_to_multiple_of:
                m = self.pad_to_multiple_of
                longest = (longest + m - 1) // m * m
            ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
            labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(features), longest), dtype=torch.long)
            for i, f in enumerate(features):
                n = len(f["input_ids"])
                ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
                labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
                mask[i, :n] = 1
            batch.update(input_ids=ids, labels=labels, attention_mask=mask)
        batch.update(self._images(features))
        return batch
