"""Shared fixtures: a tiny random LLaVA in the llava-hf layout, a small coloured-shapes dataset, one recipe builder
(``make_recipe``) and one cache of trained tiny runs (``trained_run``), all built offline once per test run."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized-data and schema caches of the tests go to a fresh folder, never the user's ~/.cache.
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


class _NotATensor:
    """Pickled into a checkpoint: torch.load(weights_only=True) refuses it, as it refuses any Python object."""


@pytest.fixture(scope="session")
def pickled_llava(tiny_llava, tmp_path_factory):
    """The tiny LLaVA with its weights as a pytorch_model.bin that pickles a Python object besides the tensors."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(tiny_llava, folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": _NotATensor()}, str(folder / "pytorch_model.bin"))
    return folder


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """(folder, train.json, eval.json) of a small coloured-shapes dataset."""
    from lora_llava.demo import make_shapes_data

    folder = tmp_path_factory.mktemp("shapes")
    train, eval_ = make_shapes_data(folder, train_samples=48, eval_samples=8, image_size=32, seed=1)
    return folder, train, eval_


@pytest.fixture(scope="session")
def make_recipe(tiny_llava, shapes_data, tmp_path_factory):
    """``make_recipe(**sections)``: the tiny stage-2 QLoRA recipe as a dict, each named section updated with the
    given keys (``make_recipe(quant={"bits": 16}, train={"max_steps": 2})``), with an output folder of its own."""
    folder, train, _ = shapes_data
    base = {
        "model": {"llava": str(tiny_llava)},
        "quant": {"bits": 4},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "data": {"train": str(train), "image_folder": str(folder), "template": "vicuna_v1", "max_length": 256},
        "train": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "projector_lr": 1e-2,
                  "logging_steps": 1, "warmup_steps": 0},
    }

    def make(**sections: dict) -> dict:
        raw = copy.deepcopy(base)
        raw["train"]["output_dir"] = str(tmp_path_factory.mktemp("run") / "run")
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return raw

    return make


@pytest.fixture
def tiny_recipe(make_recipe, tmp_path):
    """A small stage-2 QLoRA recipe (as a dict) over the tiny model and data, writing to ``tmp_path / "run"``."""
    return make_recipe(train={"output_dir": str(tmp_path / "run")})


@pytest.fixture(scope="session")
def trained_run(make_recipe):
    """``trained_run(bits=16, stage=2, owner="")``: a briefly trained tiny run (a ``TrainResult``), trained once per
    test run for each (bits, stage, owner) and shared by the export and inference tests. Tests that change a run
    folder copy it first. ``owner`` gives a test module a model of its own where in-memory state matters: on the CPU,
    bitsandbytes' 4-bit layers change their later outputs (by ~1e-2 in the logits) after their first forward in eval
    mode, so a test comparing with the train-mode forward needs a model nothing else has run."""
    from lora_llava.config.recipe import recipe_from_dict
    from lora_llava.train.sft import train

    cache = {}

    def get(bits: int = 16, stage: int = 2, owner: str = ""):
        key = (bits, stage, owner)
        if key not in cache:
            # data.template auto: plain for stage 1 (captioning), vicuna_v1 for stage 2, as the recipes have it.
            raw = make_recipe(model={"attn_implementation": "sdpa"}, quant={"bits": bits}, data={"template": "auto"},
                              train={"stage": stage, "learning_rate": 2e-2})
            cache[key] = train(recipe_from_dict(raw))
        return cache[key]

    return get
