"""The command line, end to end: a real `lora-llava sft` run and what it must leave behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_llava import __version__

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "lora_llava", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=timeout)


def _base_state(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).state_dict()


def test_version_and_help():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lora-llava {__version__}"
    r = _cli("--help")
    assert r.returncode == 0 and "sft" in r.stdout and "validate" in r.stdout


def test_validate_names_the_typo_without_traceback(tmp_path, shapes_data):
    folder, train, _ = shapes_data
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"llava": "x/y"}, "data": {"train": str(train)},
                                      "train": {"learning_rat": 1e-4, "max_steps": "ten"}}))
    r = _cli("validate", recipe)
    assert r.returncode == 2
    assert "train.learning_rat: unknown key; did you mean 'learning_rate'?" in r.stderr
    assert "train.max_steps: got 'ten' (str); expected int" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("validate", recipe, "train.learning_rat=", "train.max_steps=5")
    assert r.returncode == 2  # the override cannot remove a key; still named
    recipe.write_text(yaml.safe_dump({"model": {"llava": "x/y"}, "data": {"train": str(train)}}))
    r = _cli("validate", recipe, "train.max_steps=5", "lora.r=16")
    assert r.returncode == 0, r.stderr
    resolved = yaml.safe_load(r.stdout)
    assert resolved["train"]["max_steps"] == 5 and resolved["lora"]["r"] == 16


def test_validate_keys_lists_upstream_fields():
    r = _cli("validate", "--keys")
    assert r.returncode == 0
    assert "  learning_rate: float = 0.0002  [trl.SFTConfig]" in r.stdout
    assert "  use_rslora: bool = False  [peft.LoraConfig]" in r.stdout
    assert "  stage: 1 | 2 = 2  [lora-llava]" in r.stdout


def test_sft_end_to_end(make_recipe, tiny_llava, tmp_path):
    """Train briefly through the real CLI; the loss falls, LoRA and projector change, frozen weights do not."""
    raw = make_recipe(train={"max_steps": 12, "per_device_train_batch_size": 8, "output_dir": str(tmp_path / "run")})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    r = _cli("sft", recipe, "train.logging_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pip install kernels" not in r.stderr  # bitsandbytes' optional-kernel chatter is not the user's business
    run = tmp_path / "run"
    for name in ("recipe.yaml", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "projector.safetensors", "processor/tokenizer.json", "processor/processor_config.json",
                 "trainer_state.json", "loss.png", "data_report.json"):
        assert (run / name).is_file(), name
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "temporary files left behind"

    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["train"]["max_steps"] == 12 and resolved["train"]["logging_steps"] == 1

    losses = [h["loss"] for h in json.loads((run / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses

    base = _base_state(tiny_llava)
    projector = load_file(str(run / "projector.safetensors"))
    assert set(projector) == {f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    for key, value in projector.items():
        assert not torch.allclose(value, base[f"model.{key}"]), f"projector {key} did not change"

    adapter = load_file(str(run / "adapter/adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B is still zero: LoRA did not train"
    assert all(".language_model.layers." in k for k in adapter), "adapter holds more than the LLM's LoRA weights"


def test_frozen_weights_do_not_change(make_recipe, tiny_llava):
    """In-process: one training run changes LoRA + projector and nothing else (vision tower, base LLM, lm_head)."""
    from lora_llava.config.recipe import recipe_from_dict
    from lora_llava.train.sft import train

    raw = make_recipe()
    raw["quant"] = {"bits": 16}  # unquantized, so base weights compare exactly with the checkpoint
    raw["train"].update(max_steps=3)
    result = train(recipe_from_dict(raw))
    base = _base_state(tiny_llava)
    model = result.model.get_base_model()
    changed, unchanged = set(), set()
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        (unchanged if torch.equal(p.detach().float(), base[key].float()) else changed).add(key)
    assert changed == {f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert any(k.startswith("model.vision_tower.") for k in unchanged)
    assert any(k.startswith("model.language_model.") for k in unchanged)
    assert "lm_head.weight" in unchanged


def test_sft_bad_data_is_exit_1_naming_the_record(make_recipe, tmp_path, capsys):
    raw = make_recipe()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "ok", "conversations": [{"from": "human", "value": "a"},
                                                              {"from": "gpt", "value": "b"}]},
                               {"id": "bad", "conversations": [{"from": "human", "value": "a"}]}]))
    raw["data"]["train"] = str(bad)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    from lora_llava.cli.main import main

    assert main(["sft", str(recipe)]) == 1  # in-process: an uncaught exception (a traceback) would fail the test
    assert f"{bad}, record 1: the conversation ends on a human turn" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("quant.bits=5", "quant.bits: got 5 (int); expected 4 | 8 | 16"),
    ("nonsense", "override 'nonsense': expected section.key=value"),
    ("data.train=[]", "data.train: no training data given"),
])
def test_sft_bad_recipe_is_exit_2(tiny_recipe, tmp_path, override, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe))
    r = _cli("sft", recipe, override)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_sft_with_an_undecodable_image_skips_or_stops_before_training(make_recipe, shapes_data, tmp_path, capsys):
    """A random-bytes PNG among good records crashed training at step 0 with either data.on_bad_sample."""
    folder, train_json, _ = shapes_data
    records = json.loads(train_json.read_text())[:16]
    images = tmp_path / "images"
    images.mkdir()
    for r in records:
        (images / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        (images / r["image"]).write_bytes((folder / r["image"]).read_bytes())
    (images / records[5]["image"]).write_bytes(os.urandom(3000))
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    raw = make_recipe(quant={"bits": 16}, data={"train": str(data), "image_folder": str(images)},
                      train={"max_steps": 2})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    from lora_llava.cli.main import main

    out = Path(raw["train"]["output_dir"])
    assert main(["sft", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert f"{data}, record 5: image '{records[5]['image']}' cannot be decoded" in err
    assert not (out / "trainer_state.json").exists() and not list(out.glob("checkpoint-*"))
    assert main(["sft", str(recipe), "data.on_bad_sample=skip"]) == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["kept"] == 15 and len(report["skipped"]) == 1 and "record 5" in report["skipped"][0]
