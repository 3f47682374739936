"""lora-llava: fine-tune LLaVA-1.5 with QLoRA on one GPU, then export a model plain transformers loads.

The public API is imported lazily, so ``import lora_llava`` (and ``lora-llava --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

_API = {
    "load_recipe": "config.recipe",
    "recipe_from_dict": "config.recipe",
    "Recipe": "config.recipe",
    "ModelSpec": "llava.spec",
    "build_model": "model.stage",
    "LlavaDataset": "data",
    "LlavaCollator": "data",
    "Template": "data",
    "register_template": "data",
    "get_template": "data",
    "check_data": "data.check",
    "train": "train.sft",
    "TrainResult": "train.sft",
    "build_trainer": "train.trainer",
    "RunFolder": "run.folder",
    "merge": "export.merge",
    "load_for_inference": "infer.load",
    "generate_answers": "infer.generate",
    "chat": "infer.chat",
    "run_eval": "eval.runner",
    "score_answers": "eval.benchmarks",
    "normalize_answer": "eval.normalize",
    "ChatSession": "infer.chat",
    "LoraLlavaError": "errors",
    "RecipeError": "errors",
    "DataError": "errors",
    "ImageError": "errors",
    "ModelError": "errors",
    "MergeError": "errors",
    "InferenceError": "errors",
    "JudgeError": "errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module = importlib.import_module(f".{_API[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'lora_llava' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__)
