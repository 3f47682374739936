"""The data path: records -> samples -> tokens + labels -> batches; ``check`` runs it over a whole dataset."""

from __future__ import annotations

from .collator import LlavaCollator
from .dataset import LlavaDataset, default_cache_dir
from .images import load_image, resolve_image_path
from .report import DataReport, Problem
from .sampler import ModalityLengthGroupedSampler, modality_length_groups
from .sources import Sample, read_records
from .templates import TEMPLATES, Template, get_template, register_template
from .tokenize import encode_prompt, encode_sample

__all__ = [
    "TEMPLATES",
    "DataReport",
    "LlavaCollator",
    "LlavaDataset",
    "ModalityLengthGroupedSampler",
    "Problem",
    "Sample",
    "Template",
    "default_cache_dir",
    "encode_prompt",
    "encode_sample",
    "get_template",
    "load_image",
    "modality_length_groups",
    "read_records",
    "register_template",
    "resolve_image_path",
]
