"""lora-llava merge: exports that plain transformers loads, equal to the trained model; both layouts; bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from lora_llava.config.recipe import recipe_from_dict
from lora_llava.errors import MergeError, ModelError
from lora_llava.export.merge import merge
from lora_llava.llava.layouts import to_internal
from lora_llava.train.sft import train

IMAGE_ID = 32000


@pytest.fixture(scope="module")
def run16(trained_run):
    return trained_run(16)


@pytest.fixture(scope="module")
def run4(trained_run):
    return trained_run(4, owner="export")  # compared with its train-mode forward: a model no other test ran


def _inputs(processor, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = processor.image_processor.crop_size["height"]
    n = (size // 8) ** 2
    text = processor.tokenizer("USER: What is in the image? ASSISTANT: A red circle.").input_ids
    ids = torch.tensor([[1] + [IMAGE_ID] * n + text[1:]])
    return {"input_ids": ids, "pixel_values": torch.rand(1, 3, size, size, generator=g)}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits.float()


def _load_hf(path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32), \
        AutoProcessor.from_pretrained(str(path))


def _tensors(folder, kind):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118
                out[to_internal(k, kind)] = st.get_tensor(k)
    return out


def test_hf_export_equals_the_trained_model(run16, tmp_path):
    out = tmp_path / "export"
    result = merge(run16.output_dir, out, dtype="fp32", progress=False, max_shard_size=2_000_000)
    assert result.merged_modules == 14  # 2 layers x 7 projections
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()  # sharded
    model, processor = _load_hf(out)  # plain transformers, none of our code
    inputs = _inputs(processor)
    torch.testing.assert_close(_logits(model, inputs), _logits(run16.model, inputs), rtol=0, atol=1e-4)
    assert not any("lora" in n for n, _ in model.named_parameters())
    # The chat template renders the training prompt, with the "▁" that training's separate tokenization of the text
    # after <image> gives written as a space (the ids are compared in test_processor_fidelity.py).
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is it?"}]}], add_generation_prompt=True)
    from lora_llava.data import get_template

    training = get_template("vicuna_v1").prompt([("human", "<image>\nWhat is it?")])
    assert prompt == training.replace("<image>\n", "<image> \n")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_ID
    assert json.loads((out / "lora_llava.json").read_text())["template"] == "vicuna_v1"


def test_llava_layout_round_trips(run16, tmp_path):
    hf = merge(run16.output_dir, tmp_path / "hf", dtype="fp32", progress=False).out
    llava = merge(run16.output_dir, tmp_path / "llava", format="llava", dtype="fp32", progress=False).out
    config = json.loads((llava / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["mm_projector_type"] == "mlp2x_gelu"
    assert config["mm_vision_select_layer"] == -2 and config["mm_vision_select_feature"] == "patch"
    with safe_open(str(next(llava.glob("*.safetensors"))), "pt") as st:
        keys = set(st.keys())
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "lm_head.weight"} <= keys
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    # Converted back to internal names, every tensor equals the hf export's.
    back, ref = _tensors(llava, "llava-original"), _tensors(hf, "llava-hf")
    assert back and all(torch.equal(t, ref[name]) for name, t in back.items())
    assert set(ref) - set(back) == {n for n in ref if n.startswith("model.vision_tower.")}
    # And our original-layout loader reads it back into the same model (the tower from the folder it names).
    from lora_llava.model.loading import load_model

    model, processor = load_model(recipe_from_dict({"model": {"llava": str(llava), "attn_implementation": "sdpa"},
                                                    "quant": {"bits": 16}, "data": {"train": "x.json"}},
                                                   check_files=False))
    inputs = _inputs(processor)
    torch.testing.assert_close(_logits(model, inputs), _logits(run16.model, inputs), rtol=0, atol=1e-4)


def test_qlora_merge_from_dequantized_is_closer(run4, tmp_path):
    inputs = _inputs(run4.processor)
    trained = _logits(run4.model, inputs)
    plain = _load_hf(merge(run4.output_dir, tmp_path / "plain", dtype="fp32", progress=False).out)[0]
    deq = _load_hf(merge(run4.output_dir, tmp_path / "deq", dtype="fp32", from_dequantized=True,
                         progress=False).out)[0]
    dev_plain = (_logits(plain, inputs) - trained).abs().max().item()
    dev_deq = (_logits(deq, inputs) - trained).abs().max().item()
    print(f"max |logit - 4-bit trained model|: merge into the original weights {dev_plain:.3e}, "
          f"into the dequantized NF4 weights {dev_deq:.3e}")
    assert dev_deq < 1e-4 < dev_plain


def test_generate_on_run_and_export_agree(run16, shapes_data, tmp_path):
    from lora_llava.infer.generate import generate_answers

    out = merge(run16.output_dir, tmp_path / "export", dtype="fp32", progress=False).out
    model, processor = _load_hf(out)
    folder, _, eval_json = shapes_data
    records = json.loads(eval_json.read_text())[:4]
    turns = [[("human", r["conversations"][0]["value"])] for r in records]
    images = [[r["image"]] for r in records]
    a = generate_answers(run16.model, run16.processor, turns, images, str(folder), template="vicuna_v1",
                         max_new_tokens=8)
    b = generate_answers(model, processor, turns, images, str(folder), template="vicuna_v1", max_new_tokens=8)
    assert a == b


def test_bad_input(run16, tmp_path, tiny_llava, pickled_llava):
    with pytest.raises(MergeError, match="run folder '.*nowhere' does not exist"):
        merge(tmp_path / "nowhere", tmp_path / "o")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(MergeError, match="run folder '.*a-file' is a file, not a folder"):
        merge(tmp_path / "a-file", tmp_path / "o")
    no_adapter = tmp_path / "no_adapter"
    shutil.copytree(run16.output_dir, no_adapter)
    shutil.rmtree(no_adapter / "adapter")
    with pytest.raises(MergeError, match="stage-2 run without an adapter"):
        merge(no_adapter, tmp_path / "o")
    (tmp_path / "exists").mkdir()
    with pytest.raises(MergeError, match="--out '.*exists' exists; pass --overwrite"):
        merge(run16.output_dir, tmp_path / "exists")
    with pytest.raises(ModelError, match="--base: '.*missing-base' does not exist"):
        merge(run16.output_dir, tmp_path / "o", base=str(tmp_path / "missing-base"))
    # An adapter trained on another base: the demo model is twice as wide.
    from lora_llava.demo import make_demo_model

    wide = make_demo_model(tmp_path / "wide", image_size=32, hidden_size=128)
    with pytest.raises(MergeError, match=r"does not fit this base: model\.language_model\.layers\.0\.\S+ is "
                                         r"\(\d+, \d+\) in '.*wide' but the adapter's LoRA is \d+x\d+"):
        merge(run16.output_dir, tmp_path / "o", base=str(wide))
    # A pickle as the base is never unpickled; a damaged adapter is named.
    with pytest.raises(MergeError, match="pytorch_model.bin: a pickle that holds Python objects besides tensors"):
        merge(run16.output_dir, tmp_path / "o", base=str(pickled_llava), progress=False)
    damaged = tmp_path / "damaged"
    shutil.copytree(run16.output_dir, damaged)
    weights = damaged / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MergeError, match=f"{weights}: not a readable safetensors file"):
        merge(damaged, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))


def test_interrupted_merge_leaves_nothing(run16, tmp_path, monkeypatch):
    from lora_llava.export.safetensors_io import ShardWriter

    calls = {"n": 0}
    real = ShardWriter.flush

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real(self)

    monkeypatch.setattr(ShardWriter, "flush", flaky)
    with pytest.raises(OSError, match="No space left"):
        merge(run16.output_dir, tmp_path / "o", dtype="fp32", progress=False, max_shard_size=2_000_000)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    # An existing export survives a failed --overwrite untouched.
    monkeypatch.setattr(ShardWriter, "flush", real)
    good = merge(run16.output_dir, tmp_path / "o", dtype="fp32", progress=False).out
    before = sorted(p.name for p in good.iterdir())
    calls["n"] = 0
    monkeypatch.setattr(ShardWriter, "flush", flaky)
    with pytest.raises(OSError):
        merge(run16.output_dir, tmp_path / "o", dtype="fp32", progress=False, max_shard_size=2_000_000,
              overwrite=True)
    assert sorted(p.name for p in good.iterdir()) == before and not list(tmp_path.glob(".o.*"))


def test_merge_cli(run16, tmp_path):
    from lora_llava.cli.main import main

    assert main(["merge", str(run16.output_dir), "--out", str(tmp_path / "e"), "--dtype", "fp16"]) == 0
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["vocab_size"] == 32064
    assert main(["merge", str(run16.output_dir), "--out", str(tmp_path / "e")]) == 1  # exists


def test_stage1_run_exports_base_plus_projector(tiny_llava, shapes_data, tmp_path):
    folder, train_json, _ = shapes_data
    run = train(recipe_from_dict({
        "model": {"llava": str(tiny_llava), "attn_implementation": "sdpa"}, "quant": {"bits": 16},
        "data": {"train": str(train_json), "image_folder": str(folder), "max_length": 128},
        "train": {"stage": 1, "output_dir": str(tmp_path / "s1"), "max_steps": 2, "per_device_train_batch_size": 4,
                  "learning_rate": 1e-2, "warmup_steps": 0},
    }))
    result = merge(run.output_dir, tmp_path / "export", dtype="fp32", progress=False)
    assert result.merged_modules == 0
    model, processor = _load_hf(result.out)
    projector = model.model.multi_modal_projector
    trained = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    assert torch.equal(projector.linear_1.weight, trained.model.multi_modal_projector.linear_1.weight)
    inputs = _inputs(processor)
    torch.testing.assert_close(_logits(model, inputs), _logits(run.model, inputs), rtol=0, atol=1e-4)


def test_safetensors_writer_round_trips(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lora_llava.export.safetensors_io import write_safetensors

    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7), "c": torch.randn(2, 2, 2).half(),
               "empty": torch.zeros(0, 4), "d": torch.rand(4)}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_overwrite_replaces_only_an_earlier_export_and_an_export_is_no_base(run16, tmp_path):
    from lora_llava.cli.main import main

    # A folder of runs, the run being merged, a data file, a folder with a hand-written checkpoint marker: never
    # replaced, nothing in them deleted.
    runs = tmp_path / "runs"
    shutil.copytree(run16.output_dir, runs / "a")
    data = tmp_path / "data.json"
    data.write_text("[]")
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / "lora_llava.json").write_text('{"template": "vicuna_v1"}')
    for target in (runs, runs / "a", data, marked):
        before = sorted(str(p) for p in target.rglob("*")) if target.is_dir() else data.read_text()
        with pytest.raises(MergeError, match=f"--out '{target}' is (not an earlier lora-llava export|a file)"):
            merge(runs / "a", target, overwrite=True, progress=False)
        assert (sorted(str(p) for p in target.rglob("*")) if target.is_dir() else data.read_text()) == before
    assert main(["merge", str(runs / "a"), "--out", str(runs), "--overwrite"]) == 1
    assert (runs / "a" / "recipe.yaml").is_file()
    # An earlier export is replaced.
    export = merge(runs / "a", tmp_path / "e", dtype="fp32", progress=False).out
    (export / "stale.txt").write_text("from the first export")
    merge(runs / "a", export, dtype="fp16", progress=False, overwrite=True)
    assert not (export / "stale.txt").exists()
    assert json.loads((export / "lora_llava.json").read_text())["dtype"] == "fp16"
    assert not list(tmp_path.glob(".e.*"))
    # An export as --base would apply the LoRA a second time.
    with pytest.raises(MergeError, match=f"--base '{export}' is a lora-llava export .*a second time"):
        merge(runs / "a", tmp_path / "twice", base=str(export), progress=False)
    assert main(["merge", str(runs / "a"), "--out", str(tmp_path / "twice"), "--base", str(export)]) == 1
    assert not (tmp_path / "twice").exists()


def test_leftovers_of_a_killed_merge_are_cleaned(run16, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    stale = tmp_path / f".o.partial-{dead}@{host}-x1"  # what a SIGKILLed merge leaves
    running = tmp_path / f".o.partial-{os.getpid()}@{host}-x2"  # a merge still writing
    elsewhere = tmp_path / f".o.partial-{dead}@another-host-x3"  # a process of another machine (shared disk)
    for folder in (stale, running, elsewhere):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    merge(run16.output_dir, tmp_path / "o", dtype="fp32", progress=False)
    assert not stale.exists() and running.exists() and elsewhere.exists()
    assert sorted(p.name for p in tmp_path.glob(".o.*")) == sorted([running.name, elsewhere.name])
