"""lora-llava merge --format gguf: the files llama.cpp reads (read back with the gguf package), and llama.cpp itself
(llama-cpp-python) loading them: training's token ids, and greedy answers equal to lora-llava's.

The llama.cpp tests skip when llama-cpp-python is not installed, unless LORA_LLAVA_REQUIRE_LLAMA_CPP=1 (CI)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lora_llava.errors import MergeError
from lora_llava.export.gguf import GGUF_CHAT_TEMPLATE, MEDIA_MARKER
from lora_llava.export.merge import merge
from lora_llava.llava.tokenizer import llama2_sentencepiece_pieces

gguf = pytest.importorskip("gguf")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        if os.environ.get("LORA_LLAVA_REQUIRE_LLAMA_CPP") == "1":
            raise
        pytest.skip(f"llama-cpp-python is not installed ({e}); .ci/run installs it from the cached wheel")
    return llama_cpp


@pytest.fixture(scope="module")
def run16(trained_run):
    return trained_run(16)


@pytest.fixture(scope="module")
def gguf_f16(run16, tmp_path_factory):
    return merge(run16.output_dir, tmp_path_factory.mktemp("gguf") / "export", format="gguf", progress=False).out


@pytest.fixture(scope="module")
def hf_fp32(run16, tmp_path_factory):
    return merge(run16.output_dir, tmp_path_factory.mktemp("hf") / "export", dtype="fp32", progress=False).out


def _fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        if not field.types:
            continue
        out[name] = field.contents()
    return out


def _hf(folder, key):
    with safe_open(str(folder / "model.safetensors"), "pt") as st:
        return st.get_tensor(key)


def test_gguf_files(gguf_f16, hf_fp32):
    assert sorted(p.name for p in gguf_f16.iterdir()) == ["lora_llava.json", "mmproj-f16.gguf", "model-f16.gguf"]
    info = json.loads((gguf_f16 / "lora_llava.json").read_text())
    assert info["format"] == "gguf" and info["template"] == "vicuna_v1"
    lm = gguf.GGUFReader(str(gguf_f16 / "model-f16.gguf"))
    kv = _fields(lm)
    assert kv["general.architecture"] == "llama" and kv["llama.block_count"] == 2
    assert kv["llama.embedding_length"] == 64 and kv["llama.rope.dimension_count"] == 16
    tokens, scores, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.scores"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(scores) == len(types) == 32064
    pieces = llama2_sentencepiece_pieces()
    assert tokens[:32000] == [p for p, _, _ in pieces] and types[:32000] == [t for _, _, t in pieces]
    np.testing.assert_allclose(scores[:32000], [s for _, s, _ in pieces])
    assert tokens[32000:32003] == ["<image>", "<pad>", "[PAD32002]"] and types[32000:32003] == [3, 3, 5]
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.padding_token_id"]) == (1, 2, 32001)
    assert kv["tokenizer.chat_template"] == GGUF_CHAT_TEMPLATE
    tensors = {t.name: t for t in lm.tensors}
    assert len(tensors) == 3 + 2 * 9
    # q is stored with each head's rows interleaved (llama.cpp's RoPE pairs); undone, it is the trained weight.
    q = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data)).float()
    ref = _hf(hf_fp32, "language_model.model.layers.1.self_attn.q_proj.weight")
    undone = q.reshape(4, 8, 2, 64).transpose(1, 2).reshape(64, 64)
    torch.testing.assert_close(undone, ref, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(q, ref, atol=1e-3)
    v = torch.from_numpy(np.array(tensors["blk.1.attn_v.weight"].data)).float()
    torch.testing.assert_close(v, _hf(hf_fp32, "language_model.model.layers.1.self_attn.v_proj.weight"),
                               rtol=1e-3, atol=1e-3)
    emb = tensors["token_embd.weight"]
    assert tuple(emb.shape) == (64, 32064) and emb.tensor_type == gguf.GGMLQuantizationType.F16

    mm = gguf.GGUFReader(str(gguf_f16 / "mmproj-f16.gguf"))
    kv = _fields(mm)
    assert kv["general.architecture"] == "clip" and kv["clip.projector_type"] == "mlp"
    # vision_feature_layer -2 of a 2-block tower: the output of block 0, one block written.
    assert kv["clip.vision.block_count"] == 1 and list(kv["clip.vision.feature_layer"]) == [1]
    assert kv["clip.vision.image_size"] == 32 and kv["clip.vision.patch_size"] == 8
    assert kv["clip.vision.projection_dim"] == 64 and kv["clip.use_gelu"] is False  # CLIP's quick_gelu
    np.testing.assert_allclose(kv["clip.vision.image_mean"], [0.48145466, 0.4578275, 0.40821073], rtol=1e-6)
    names = {t.name for t in mm.tensors}
    assert {"v.class_embd", "v.patch_embd.weight", "v.position_embd.weight", "v.pre_ln.weight", "mm.0.weight",
            "mm.2.bias", "v.blk.0.ffn_up.weight", "v.blk.0.ffn_down.weight"} <= names
    assert not any(n.startswith(("v.blk.1.", "v.post_ln")) for n in names)
    tm = {t.name: t for t in mm.tensors}
    fc1 = torch.from_numpy(np.array(tm["v.blk.0.ffn_up.weight"].data)).float()
    torch.testing.assert_close(fc1, _hf(hf_fp32, "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"),
                               rtol=1e-3, atol=1e-3)


def test_gguf_chat_template_renders_training_prompt():
    from jinja2 import Environment

    from lora_llava.data import get_template

    template = Environment().from_string(GGUF_CHAT_TEMPLATE)
    # llama.cpp puts the media marker before the user's text (mtmd-cli, llama-server).
    prompt = template.render(messages=[{"role": "user", "content": MEDIA_MARKER + "What is it?"}],
                             add_generation_prompt=True)
    training = get_template("vicuna_v1").prompt([("human", "<image>\nWhat is it?")])
    assert prompt == training.replace("<image>", MEDIA_MARKER)
    two = template.render(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                    {"role": "user", "content": "Bye"}], add_generation_prompt=True)
    assert two == get_template("vicuna_v1").prompt([("human", "Hi"), ("gpt", "Hello."), ("human", "Bye")])


def test_gguf_bad_quant(run16, tmp_path):
    with pytest.raises(MergeError, match="--gguf-quant 'q3': choose one of f16, q8_0, q4_k_m"):
        merge(run16.output_dir, tmp_path / "o", format="gguf", gguf_quant="q3")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python).


def _handler(llama_cpp, mmproj, template):
    """llama-cpp-python's LLaVA-1.5 handler (mtmd) with the export's own chat template instead of its built-in one
    (which has another system prompt and other separators than LLaVA-1.5's training format)."""
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    handler = Llava15ChatHandler(clip_model_path=str(mmproj), verbose=False)
    handler.DEFAULT_SYSTEM_MESSAGE = None  # the template carries vicuna_v1's system prompt
    handler.CHAT_FORMAT = template
    return handler


def llama_cpp_answers(model_path, mmproj, questions, image_paths, max_tokens=12):
    """Greedy answers of llama.cpp (llama-cpp-python) to one question about each image."""
    import base64

    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=512, n_threads=2, verbose=False, seed=0)
    llm.chat_handler = _handler(llama_cpp, mmproj, llm.metadata["tokenizer.chat_template"])
    answers = []
    for question, path in zip(questions, image_paths, strict=True):
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                   {"type": "text", "text": question}]}],
            temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=max_tokens)
        answers.append(out["choices"][0]["message"]["content"].strip())
    return answers


def test_llama_cpp_tokenizes_like_training(gguf_f16, run16):
    llama_cpp = _llama_cpp()
    from lora_llava.data import get_template
    from lora_llava.data.tokenize import encode_prompt
    from lora_llava.demo import QUESTIONS

    llm = llama_cpp.Llama(model_path=str(gguf_f16 / "model-f16.gguf"), vocab_only=True, verbose=False)
    tok, tmpl = run16.processor.tokenizer, get_template("vicuna_v1")
    questions = [*QUESTIONS, "two  spaces and a\ttab", "Ünïcödé ✓ 東京 🙂", "line\nbreak", " leading space"]
    for question in questions:
        turns = [("human", f"<image>\n{question}")]
        ids = encode_prompt(turns, tok, tmpl, 32000, 1)
        before, after = tmpl.prompt(turns).split("<image>")
        # mtmd tokenizes the text on each side of the image on its own, BOS on the first piece only.
        i = ids.index(32000)
        assert llm.tokenize(before.encode(), add_bos=True, special=True) == ids[:i], question
        assert llm.tokenize(after.encode(), add_bos=False, special=True) == ids[i + 1:], question
    turns = [("human", "Hi"), ("gpt", "Hello there."), ("human", "What now?")]  # text only, two rounds
    assert llm.tokenize(tmpl.prompt(turns).encode(), add_bos=True, special=True) == encode_prompt(
        turns, tok, tmpl, 32000, 1)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """40 held-out coloured-shape images (not the training set) and a question for each."""
    from lora_llava.demo import make_shapes_data

    folder = tmp_path_factory.mktemp("held_out")
    _, eval_json = make_shapes_data(folder, train_samples=0, eval_samples=40, image_size=32, seed=123)
    records = json.loads(eval_json.read_text())
    return folder, [r["conversations"][0]["value"].removeprefix("<image>\n") for r in records], \
        [r["image"] for r in records]


def test_llama_cpp_answers_like_lora_llava(gguf_f16, run16, held_out):
    _llama_cpp()
    from lora_llava.infer.generate import generate_answers

    folder, questions, images = held_out
    ours = generate_answers(run16.model, run16.processor, [[("human", f"<image>\n{q}")] for q in questions],
                            [[i] for i in images], str(folder), template="vicuna_v1", max_new_tokens=12)
    theirs = llama_cpp_answers(gguf_f16 / "model-f16.gguf", gguf_f16 / "mmproj-f16.gguf", questions,
                               [folder / i for i in images])
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"llama.cpp f16 vs lora-llava chat: {same}/{len(ours)} greedy answers equal")
    for a, b in zip(ours, theirs, strict=True):
        if a != b:
            print(f"  lora-llava {a!r} | llama.cpp {b!r}")
    assert same >= 0.95 * len(ours)
