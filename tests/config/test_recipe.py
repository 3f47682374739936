"""Recipes: parsing, overrides, and every error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_llava.config.recipe import apply_overrides, load_recipe, recipe_from_dict
from lora_llava.errors import RecipeError

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def _minimal(tmp_path, **sections):
    data = tmp_path / "train.json"
    data.write_text("[]")
    raw = {"model": {"llava": "llava-hf/llava-1.5-7b-hf"}, "data": {"train": str(data)}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


def test_defaults_are_llava15_stage2(tmp_path):
    r = recipe_from_dict(_minimal(tmp_path))
    assert r.train.stage == 2 and r.template == "vicuna_v1"
    assert (r.lora.r, r.lora.lora_alpha, r.lora.lora_dropout) == (128, 256, 0.05)
    assert r.train.learning_rate == 2e-4 and r.train.projector_lr == 2e-5
    assert r.train.lr_scheduler_type == "cosine" and r.train.warmup_steps == 0.03
    assert r.quant.bits == 4 and r.quant.bnb_4bit_quant_type == "nf4" and r.quant.bnb_4bit_use_double_quant
    assert r.data.max_length == 2048 and r.data.image_aspect_ratio == "pad"


def test_stage1_defaults_to_plain_template(tmp_path):
    r = recipe_from_dict(_minimal(tmp_path, train={"stage": 1}, quant={"bits": 16}))
    assert r.template == "plain"



def test_upstream_fields_pass_through(tmp_path):
    # Fields nobody declared here: they come from trl.SFTConfig / peft.LoraConfig / BitsAndBytesConfig.
    r = recipe_from_dict(_minimal(tmp_path, train={"adam_beta2": 0.95, "optim": "paged_adamw_8bit"},
                                  lora={"use_rslora": True}, quant={"bnb_4bit_quant_storage": "bfloat16"}))
    assert r.train.adam_beta2 == 0.95 and r.train.optim == "paged_adamw_8bit"
    assert r.lora.use_rslora is True
    assert r.quant.bnb_4bit_quant_storage == "bfloat16"


def test_report_to_passes_through_and_a_missing_package_is_named(tmp_path, monkeypatch):
    import importlib.util

    import torch

    from lora_llava.train.sft import sft_config

    real = importlib.util.find_spec
    installed = {"tensorboard": real("json")}  # any spec: "installed"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: installed.get(name) if name in ("wandb", "tensorboard", "tensorboardX")
                        else real(name, *a))
    r = recipe_from_dict(_minimal(tmp_path, train={"report_to": ["tensorboard"]}))
    assert sft_config(r, torch.float32).report_to == ["tensorboard"]
    with pytest.raises(RecipeError, match=r"train.report_to: 'wandb' needs the wandb package \(pip install wandb\)"):
        recipe_from_dict(_minimal(tmp_path, train={"report_to": "wandb"}))
    installed.clear()
    with pytest.raises(RecipeError, match="train.report_to: 'tensorboard' needs the tensorboard package"):
        recipe_from_dict(_minimal(tmp_path, train={"report_to": ["none", "tensorboard"]}))
    r = recipe_from_dict(_minimal(tmp_path, train={"report_to": "none"}))
    assert sft_config(r, torch.float32).report_to == []


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(_minimal(tmp_path, train={"learning_rat": 1e-4}))
    assert "train.learning_rat: unknown key; did you mean 'learning_rate'?" in str(e.value)


def test_unknown_section_suggests_the_closest(tmp_path):
    raw = _minimal(tmp_path)
    raw["trian"] = {}
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw)
    assert "trian: unknown section; did you mean 'train'?" in str(e.value)


def test_wrong_type_names_key_value_and_type(tmp_path):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(_minimal(tmp_path, train={"max_steps": "ten"}, quant={"bits": 3}))
    msg = str(e.value)
    assert "train.max_steps: got 'ten' (str); expected int" in msg
    assert "quant.bits: got 3 (int); expected 4 | 8 | 16" in msg


def test_all_problems_reported_together(tmp_path):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(_minimal(tmp_path, model={"atn_implementation": "sdpa"}, lora={"r": "big"},
                                  train={"stage": 3, "lerning_rate": 1.0}))
    assert len(e.value.problems) == 4
    assert str(e.value).startswith("recipe has 4 problems:")


def test_managed_field_is_refused_with_the_reason(tmp_path):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(_minimal(tmp_path, train={"max_length": 512}))
    assert "train.max_length: set by lora-llava, not in a recipe (use data.max_length)" in str(e.value)


def test_missing_data_file_is_named(tmp_path):
    raw = _minimal(tmp_path)
    raw["data"]["train"] = str(tmp_path / "nope.json")
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw)
    assert f"data.train: file '{tmp_path / 'nope.json'}' does not exist" in str(e.value)


def test_model_source_required(tmp_path):
    raw = _minimal(tmp_path)
    del raw["model"]
    with pytest.raises(RecipeError, match="set model.llava"):
        recipe_from_dict(raw)


def test_overrides_and_scientific_notation(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{llava: x/y}}\ndata: {{train: {tmp_path / 'train.json'}}}\n"
                    "train: {learning_rate: 1e-4}\n")
    (tmp_path / "train.json").write_text("[]")
    r = load_recipe(path, ["train.max_steps=50", "lora.r=16", "lora.target_modules=[q_proj, v_proj]",
                           "train.projector_lr=3e-5"])
    assert isinstance(r.train.learning_rate, float) and r.train.learning_rate == 1e-4
    assert r.train.max_steps == 50 and r.lora.r == 16 and r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.train.projector_lr == 3e-5


def test_malformed_override(tmp_path):
    raw, problems = apply_overrides({}, ["train.max_steps", "max_steps=3", "train.x.y=1"])
    assert len(problems) == 3 and all("expected section.key=value" in p for p in problems)


def test_yaml_syntax_error_has_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  llava: [unclosed\n")
    with pytest.raises(RecipeError, match=r"not valid YAML at line \d+"):
        load_recipe(path)


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


def test_resolved_recipe_round_trips(tmp_path):
    r = recipe_from_dict(_minimal(tmp_path, train={"adam_beta2": 0.95}))
    again = recipe_from_dict(yaml.safe_load(r.to_yaml()))
    assert again.to_dict() == r.to_dict()
    assert again.train.adam_beta2 == 0.95


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path):
    text = path.read_text()
    head = [line for line in text.splitlines()[:4] if line.startswith("#")]
    assert any(line.startswith("# Launch:") and f"lora-llava sft recipes/{path.name}" in line for line in head), head
    assert any(line.startswith("# Override:") for line in head), head
    # Data files of the real recipes live on the user's disk: check everything but their existence.
    recipe = recipe_from_dict(yaml.safe_load(text), str(path), check_files=False)
    assert recipe.data.train


@pytest.mark.parametrize("name, file, url", [
    ("llava15_7b_pretrain.yaml", "blip_laion_cc_sbu_558k.json", "huggingface.co/datasets/liuhaotian/LLaVA-Pretrain"),
    ("llava15_13b.yaml", "llava_v1_5_mix665k.json", "huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K"),
])
def test_shipped_recipe_without_its_data_says_where_to_get_it(name, file, url, tmp_path, capsys, monkeypatch):
    """Run where LLaVA's data is not downloaded: exit 2, naming the file, 'not downloaded yet' and the download page;
    with --no-files the recipe alone is checked (exit 0)."""
    from lora_llava.cli.main import main

    monkeypatch.chdir(tmp_path)
    recipe = next(p for p in RECIPES if p.name == name)
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "data.train: file 'playground/data/" in err and f"{file}' not downloaded yet" in err and url in err
    assert "data.image_folder: 'playground/data" in err and "not downloaded yet" in err
    assert main(["validate", str(recipe), "--no-files"]) == 0
    assert f"# {recipe}: OK" in capsys.readouterr().out


def test_recipe_file_mistakes_are_named(tmp_path):
    """Each used to give a misleading message or a traceback: a folder ("does not exist"), a top-level list
    ("model: set model.llava ..."), a duplicate key (the last one silently won), latin-1 text (UnicodeDecodeError)."""
    def problems(text: str | bytes) -> str:
        path = tmp_path / "r.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(RecipeError) as e:
            load_recipe(path, check_files=False)
        return str(e.value)

    with pytest.raises(RecipeError, match="is a folder; give the recipe's YAML file"):
        load_recipe(tmp_path)
    assert "the top level must be a mapping of sections (model, quant, lora, data, train), got list" in problems(
        "- model\n- train\n")
    assert "key 'learning_rate' appears twice (lines 2 and 3)" in problems(
        "train:\n  learning_rate: 1e-4\n  learning_rate: 2e-4\n")
    assert "not UTF-8 text" in problems("model:\n  llava: caf\xe9\n".encode("latin-1"))


def test_recipe_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("\ufeffmodel:\n  llava: some/model\ndata:\n  train: x.json\n".encode())
    assert load_recipe(path, check_files=False).model.llava == "some/model"


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=-3e-3", "train.learning_rate: must be >= 0, got -0.003"),
    ("train.per_device_train_batch_size=0", "train.per_device_train_batch_size: must be at least 1, got 0"),
    ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps: must be at least 1, got 0"),
    ("train.max_steps=-5", "train.max_steps: must be at least 1 (or -1: train for num_train_epochs), got -5"),
    ("train.num_train_epochs=0", "train.num_train_epochs: must be > 0 when train.max_steps is not set, got 0"),
    ("lora.lora_dropout=1.5", "lora.lora_dropout: must be in [0, 1), got 1.5"),
    ("train.logging_steps=0", "train.logging_steps: must be > 0, got 0"),
    ("train.warmup_steps=-3", "train.warmup_steps: must be >= 0 (a count, or a fraction below 1), got -3"),
    ("train.bf16=true", "train.bf16 and train.fp16: choose one mixed precision, not both"),
    ("model.projector=./no-such-run", "model.projector: './no-such-run' does not exist"),
])
def test_values_that_cannot_train_are_recipe_errors(override, message, tmp_path):
    """Each of these passed validate and then crashed sft after the model loaded (or trained silently wrong)."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"llava": "llava-hf/llava-1.5-7b-hf"}, "data": {"train": "x.json"},
                                    "train": {"fp16": "bf16" in override}}))
    with pytest.raises(RecipeError) as e:
        load_recipe(path, [override], check_files=True)
    assert message in str(e.value)


def test_whole_numbers_keep_their_type(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {llava: x/y}\ntrain: {logging_steps: 5, warmup_steps: 3, max_steps: 100.0}\n"
                    "lora: {r: 16.0}\n")
    r = load_recipe(path, check_files=False)
    # An int written for a float field stays an int (validate printed 'logging_steps: 5.0'); a whole float for an
    # int field is that int.
    assert r.train.logging_steps == 5 and type(r.train.logging_steps) is int
    assert type(r.train.max_steps) is int and type(r.lora.r) is int and r.lora.r == 16
    text = r.to_yaml()
    assert "logging_steps: 5\n" in text and "warmup_steps: 3\n" in text and "max_steps: 100\n" in text
    with pytest.raises(RecipeError, match=r"train.max_steps: got 100.5 \(float\); expected int"):
        load_recipe(path, ["train.max_steps=100.5"], check_files=False)
