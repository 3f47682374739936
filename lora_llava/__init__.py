"""lora-llava: fine-tune LLaVA-1.5 with QLoRA on one GPU, then export a model plain transformers loads.

The public API is imported lazily, so ``import lora_llava`` (and ``lora-llava --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

_API = {
    "load_recipe": "recipe",
    "recipe_from_dict": "recipe",
    "Recipe": "recipe",
    "RecipeError": "recipe",
    "build_model": "modeling",
    "ModelError": "modeling",
    "LlavaDataset": "data",
    "LlavaCollator": "data",
    "DataError": "data",
    "Template": "data",
    "register_template": "data",
    "get_template": "data",
    "train": "training",
    "TrainResult": "training",
    "generate_answers": "inference",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module = importlib.import_module(f".{_API[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'lora_llava' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
