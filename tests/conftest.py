"""Shared fixtures: a tiny random LLaVA in the llava-hf layout and a small coloured-shapes dataset, built offline."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized-data caches of the tests go to a fresh folder, never the user's ~/.cache.
os.environ["LORA_LLAVA_CACHE"] = tempfile.mkdtemp(prefix="lora-llava-test-cache-")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vicuna_tokenizer():
    from lora_llava.llava.tokenizer import vicuna_tokenizer

    return vicuna_tokenizer()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """Path of a tiny random LLaVA (llava-hf layout, real Vicuna tokenizer + <image> + <pad>)."""
    from lora_llava.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("tiny") / "model", image_size=32, hidden_size=64)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """(folder, train.json, eval.json) of a small coloured-shapes dataset."""
    from lora_llava.demo import make_shapes_data

    folder = tmp_path_factory.mktemp("shapes")
    train, eval_ = make_shapes_data(folder, train_samples=48, eval_samples=8, image_size=32, seed=1)
    return folder, train, eval_


@pytest.fixture
def tiny_recipe(tiny_llava, shapes_data, tmp_path):
    """A small stage-2 QLoRA recipe (as a dict) over the tiny model and data."""
    folder, train, _ = shapes_data
    return {
        "model": {"llava": str(tiny_llava)},
        "quant": {"bits": 4},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"train": str(train), "image_folder": str(folder), "template": "vicuna_v1", "max_length": 256},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "per_device_train_batch_size": 4,
                  "learning_rate": 1e-2, "projector_lr": 1e-2, "logging_steps": 1, "warmup_steps": 0},
    }
