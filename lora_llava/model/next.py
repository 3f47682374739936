"""What loading a LLaVA-NeXT (AnyRes) model adds to LLaVA-1.5's: an image processor that cuts images into grids of
tiles, the processor that counts each image's tokens from its size, and the ``image_newline`` embedding.

``image_newline`` is the learned vector transformers' ``LlavaNextModel`` appends after every row of an image's grid
features (the original LLaVA-1.6 does the same; the LLaVA-1.5-HD paper has no such embedding). A model assembled from
parts has none yet: it gets a fresh one drawn as the reference draws it (normal, std ``1/sqrt(hidden)``), but from a
fixed seed, so the same parts always give the same model; it trains with the projector and is saved with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..llava.constants import IMAGE_TOKEN
from ..llava.layouts import IMAGE_NEWLINE

__all__ = ["IMAGE_NEWLINE_SEED", "fresh_image_newline", "has_image_newline", "init_image_newline",
           "next_image_processor", "next_processor"]

IMAGE_NEWLINE_SEED = 0
"""Seed of a fresh ``image_newline``: a model assembled twice from the same parts is the same model."""

_PROCESSOR_KEYS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
                   "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def next_image_processor(clip, pinpoints: Sequence[Sequence[int]]):
    """A ``LlavaNextImageProcessor`` that prepares every tile (and the downscaled whole image) as ``clip`` (the
    tower's ``CLIPImageProcessor``) prepares an image, with the grid resolutions ``pinpoints``."""
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(image_grid_pinpoints=[list(p) for p in pinpoints], do_pad=True,
                                   **{k: getattr(clip, k) for k in _PROCESSOR_KEYS if hasattr(clip, k)})


def next_processor(image_processor, tokenizer, patch_size: int, strategy: str):
    """A ``LlavaNextProcessor``: it expands each ``<image>`` into as many tokens as that image's size gives."""
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                              vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                              image_token=IMAGE_TOKEN)


def fresh_image_newline(hidden: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new ``image_newline``: normal with std ``1/sqrt(hidden)`` (as the reference draws it), from a fixed seed."""
    generator = torch.Generator().manual_seed(IMAGE_NEWLINE_SEED)
    return (torch.randn(hidden, generator=generator, dtype=torch.float32) / math.sqrt(hidden)).to(dtype)


def has_image_newline(model) -> bool:
    """Does ``model`` (whatever wraps it) have LLaVA-NeXT's ``image_newline``?"""
    return any(n.endswith(IMAGE_NEWLINE) for n, _ in model.named_parameters())


def init_image_newline(model) -> None:
    """Give a freshly assembled LLaVA-NeXT model its :func:`fresh_image_newline`."""
    param = model.model.image_newline
    with torch.no_grad():
        param.copy_(fresh_image_newline(param.shape[0]).to(param.device, param.dtype))
