"""Training pieces: stage chaining, projector files, the projector's learning rate, padding-free equivalence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.data import LlavaCollator
from lora_llava.errors import ModelError, RecipeError
from lora_llava.llava.spec import config_image_token_id as image_token_id
from lora_llava.llava.spec import config_image_tokens as num_image_tokens
from lora_llava.model.stage import build_model
from lora_llava.train.loss import answer_only_loss
from lora_llava.train.sft import build_datasets, sft_config, train
from lora_llava.train.trainer import build_trainer


def test_stage1_projector_loads_into_stage2_bit_exactly(make_recipe, tmp_path):
    raw = make_recipe(train=dict(stage=1, max_steps=2, output_dir=str(tmp_path / "s1")))
    raw["quant"] = {"bits": 16}
    stage1 = train(recipe_from_dict(raw))
    assert not (stage1.output_dir / "adapter").exists()  # stage 1 has no LoRA
    saved = load_file(str(stage1.output_dir / "projector.safetensors"))
    raw = make_recipe()
    raw["model"]["projector"] = str(stage1.output_dir)
    model, _ = build_model(recipe_from_dict(raw))
    projector = model.get_base_model().model.multi_modal_projector
    for key, value in saved.items():
        assert torch.equal(projector.state_dict()[key.removeprefix("multi_modal_projector.")], value), key


def test_reference_mm_projector_bin(make_recipe, tmp_path):
    raw = make_recipe()
    ref = {"model.mm_projector.0.weight": torch.randn(64, 64), "model.mm_projector.0.bias": torch.randn(64),
           "model.mm_projector.2.weight": torch.randn(64, 64), "model.mm_projector.2.bias": torch.randn(64)}
    torch.save(ref, tmp_path / "mm_projector.bin")
    raw["model"]["projector"] = str(tmp_path / "mm_projector.bin")
    model, _ = build_model(recipe_from_dict(raw))
    projector = model.get_base_model().model.multi_modal_projector
    assert torch.equal(projector.linear_1.weight, ref["model.mm_projector.0.weight"])
    assert torch.equal(projector.linear_2.bias, ref["model.mm_projector.2.bias"])

    # A projector made for another LLM width (7B into 13B, say) is named with both shapes.
    torch.save({k: torch.randn(128, *v.shape[1:]) for k, v in ref.items()}, tmp_path / "wide.bin")
    raw["model"]["projector"] = str(tmp_path / "wide.bin")
    # ... before any weights load (stage chaining fails fast).
    import lora_llava.model.stage as stage

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the projector was checked")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage, "load_model", no_load)
        with pytest.raises(ModelError, match=r"has linear_1.weight of shape \(128, 64\), but model.llava '.*' needs "
                                             r"\(64, 64\) \(a projector trained for another LLM"):
            build_model(recipe_from_dict(raw))
    raw["model"]["projector"] = str(tmp_path / "missing")
    with pytest.raises(RecipeError, match="model.projector: '.*missing' does not exist"):  # the recipe check
        recipe_from_dict(raw)
    with pytest.raises(ModelError, match="model.projector: '.*missing' does not exist"):  # and the loader
        build_model(recipe_from_dict(raw, check_files=False))


def test_projector_lr_reaches_its_parameter_group(make_recipe):
    recipe = recipe_from_dict(make_recipe(train=dict(learning_rate=1e-3, projector_lr=3e-5, weight_decay=0.1)))
    model, processor = build_model(recipe)
    train_ds, _ = build_datasets(recipe, processor, model.config)
    trainer = build_trainer(recipe, model, processor, train_ds.to_hf(), args=sft_config(recipe, torch.float32),
                            collator=LlavaCollator(processor.image_processor, 0))
    # The checkpoint marker stays the last callback, whatever is added after it.
    from transformers import TrainerCallback

    from lora_llava.train.trainer import CheckpointMarker

    trainer.add_callback(TrainerCallback())
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert kinds[-1] is CheckpointMarker and kinds.count(CheckpointMarker) == 1 and TrainerCallback in kinds
    opt = trainer.create_optimizer()
    projector_ids = {id(p) for n, p in model.named_parameters() if "multi_modal_projector" in n}
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        if ids & projector_ids:
            assert ids <= projector_ids and group["lr"] == 3e-5
        else:
            assert group["lr"] == 1e-3
    # No weight decay on biases; decay on the weights.
    bias_ids = {id(p) for n, p in model.named_parameters() if n.endswith("bias") and p.requires_grad}
    for group in opt.param_groups:
        if {id(p) for p in group["params"]} & bias_ids:
            assert group["weight_decay"] == 0.0
    assert any(g["weight_decay"] == 0.1 for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())


def test_answer_only_loss_equals_model_loss(make_recipe):
    recipe = recipe_from_dict(make_recipe())
    model, processor = build_model(recipe)
    model.eval()
    train_ds, _ = build_datasets(recipe, processor, model.config)
    batch = LlavaCollator(processor.image_processor, processor.tokenizer.pad_token_id,
                          recipe.data.image_folder)([train_ds[i] for i in range(3)])
    with torch.no_grad():
        ours, _ = answer_only_loss(model, dict(batch))
        theirs = model(**batch, use_cache=False).loss
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)


def test_padding_free_equals_padded(make_recipe, vicuna_tokenizer):
    raw = make_recipe()
    raw["quant"] = {"bits": 16}
    recipe = recipe_from_dict(raw)
    model, processor = build_model(recipe)
    model.eval()
    train_ds, _ = build_datasets(recipe, processor, model.config)
    from lora_llava.data import LlavaDataset

    text_only = LlavaDataset.from_records(
        [{"id": "t", "conversations": [{"from": "human", "value": "Say hi twice."},
                                       {"from": "gpt", "value": "Hi hi, and more words here."}]}],
        processor.tokenizer, "vicuna_v1", image_token_id=image_token_id(model.config),
        num_image_tokens=num_image_tokens(model.config))
    feats = [train_ds[0], text_only[0], train_ds[1]]
    assert len({len(f["input_ids"]) for f in feats}) > 1  # different lengths, so padding happens
    common = (processor.image_processor, processor.tokenizer.pad_token_id, recipe.data.image_folder)
    padded = LlavaCollator(*common)(feats)
    flat = LlavaCollator(*common, padding_free=True)(feats)
    with torch.no_grad():
        loss_padded, _ = answer_only_loss(model, dict(padded))
        loss_flat, _ = answer_only_loss(model, dict(flat))
        llava = model.get_base_model()
        h_pad = llava.model(**{k: v for k, v in padded.items() if k != "labels"}, use_cache=False).last_hidden_state
        h_flat = llava.model(**{k: v for k, v in flat.items() if k != "labels"}, use_cache=False).last_hidden_state
    assert torch.allclose(loss_padded, loss_flat, atol=1e-5), (loss_padded, loss_flat)
    start = 0
    for row, f in enumerate(feats):
        n = len(f["input_ids"])
        assert torch.allclose(h_pad[row, :n], h_flat[0, start:start + n], atol=1e-4), row
        start += n


def test_output_dir_that_cannot_be_written_fails_before_loading(make_recipe, tmp_path, capsys):
    """train.output_dir under a file (cannot be created): exit 2 naming the key, before any weights load (it used to
    fail with a traceback after loading, or after all the steps)."""
    import yaml

    import lora_llava.model.stage as stage
    from lora_llava.cli.main import main

    (tmp_path / "a-file").write_text("not a folder")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(make_recipe(train={"output_dir": str(tmp_path / "a-file" / "run")})))

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage, "load_model", no_load)
        assert main(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"train.output_dir: '{tmp_path / 'a-file' / 'run'}' cannot be written" in err


def test_eval_strategy_without_eval_data_fails_before_loading(make_recipe, capsys):
    """train.eval_strategy: steps with no data.eval crashed after the model loaded; now exit 2 naming the key."""
    import yaml

    from lora_llava.cli.main import main

    raw = make_recipe(train={"eval_strategy": "steps", "eval_steps": 2})
    path = Path(raw["train"]["output_dir"]).parent / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sft", str(path)]) == 2
    assert "train.eval_strategy: 'steps' needs evaluation data (data.eval" in capsys.readouterr().err
    assert not Path(raw["train"]["output_dir"]).exists()  # refused before anything was written


@pytest.mark.parametrize(("save", "fault"), [("no", "ctrl-c"), ("steps", "ctrl-c"), ("steps", "disk full")])
def test_a_run_stopped_early_says_what_is_left(make_recipe, save, fault, monkeypatch, capsys, caplog):
    import errno
    import shutil
    from collections import namedtuple

    from transformers import TrainerCallback

    from lora_llava.errors import StorageError

    class Fault(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                if fault == "ctrl-c":
                    raise KeyboardInterrupt
                raise OSError(errno.ENOSPC, "No space left on device", str(Path(args.output_dir) / "checkpoint-4"))

    # A disk with 1 kB free: the run warns before step 1 that its checkpoints will not fit.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    raw = make_recipe(quant={"bits": 16}, train={"max_steps": 6, "save_strategy": save, "save_steps": 2})
    with pytest.raises(StorageError if fault == "disk full" else KeyboardInterrupt) as info:
        train(recipe_from_dict(raw), callbacks=[Fault()])
    message = str(info.value)
    folder = Path(raw["train"]["output_dir"])
    assert f"'{folder}' has 0.00 GB free, but this run will write about" in caplog.text
    if save == "no":
        assert message.startswith("training stopped at step 3; nothing trained was saved") and "'no'" in message
        assert not list(folder.glob("checkpoint-*"))
    else:
        assert f"the newest complete checkpoint is '{folder / 'checkpoint-2'}'" in message
        assert "--resume auto" in message
    if fault == "disk full":
        assert message.startswith(f"writing to '{folder}' failed at step 3 (No space left on device: ")
        return
    # The command prints it on a line of its own (a progress bar may hold the current one) and exits 130.
    from lora_llava.cli import main as cli

    def interrupted(args):
        raise info.value

    monkeypatch.setitem(cli.COMMANDS, "report", (interrupted, "", lambda p: p.add_argument("run_dir")))
    capsys.readouterr()
    assert cli.main(["report", "x"]) == 130
    assert capsys.readouterr().err == f"\ninterrupted: {message}\n"
