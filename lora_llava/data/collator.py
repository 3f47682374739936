"""Batches for the trainer: images decoded here (so in DataLoader workers), text already tokenized."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..llava.constants import CLIP_MEAN, IGNORE_INDEX
from .images import load_image

__all__ = ["LlavaCollator"]


@dataclasses.dataclass
class LlavaCollator:
    """Turns encoded samples (``input_ids``, ``labels``, ``image_files``) into a model batch.

    Right-padded by default (pad id, labels -100, attention mask). With ``padding_free`` the batch is one row: the
    samples concatenated, ``position_ids`` restarting at 0 for each, no attention mask; flash-attn's varlen kernel
    (and, on the CPU, transformers' sdpa with ``use_cache=False``) keeps the samples from attending to each other.
    """

    image_processor: Any
    pad_token_id: int
    image_folder: str | None = None
    image_aspect_ratio: str = "pad"
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def _pixel_values(self, features: list[dict]) -> torch.Tensor | None:
        files = [f for feat in features for f in (feat.get("image_files") or [])]
        if not files:
            return None
        mean = tuple(getattr(self.image_processor, "image_mean", None) or CLIP_MEAN)
        images = [load_image(self.image_folder, f, self.image_aspect_ratio, mean) for f in files]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

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
        pixel_values = self._pixel_values(features)
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
        return batch
