"""The data path: records -> samples -> tokens + labels -> batches."""

from __future__ import annotations

from .collator import LlavaCollator
from .dataset import DataReport, LlavaDataset, default_cache_dir
from .images import ImageError, load_image, resolve_image_path
from .sampler import ModalityLengthGroupedSampler, modality_length_groups
from .sources import DataError, Sample, read_records
from .templates import IMAGE_TAG, TEMPLATES, Template, get_template, register_template
from .tokenize import IGNORE_INDEX, encode_prompt, encode_sample

__all__ = [
    "DataReport",
    "IGNORE_INDEX",
    "IMAGE_TAG",
    "TEMPLATES",
    "DataError",
    "ImageError",
    "LlavaCollator",
    "LlavaDataset",
    "ModalityLengthGroupedSampler",
    "Sample",
    "Template",
    "default_cache_dir",
    "encode_prompt",
    "encode_sample",
    "get_template",
    "load_image",
    "modality_length_groups",
    "read_records",
    "resolve_image_path",
    "register_template",
]

