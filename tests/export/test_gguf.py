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


def llama_cpp_answers(model_path, mmproj, questions, image_paths, max_tokens=12):
    """Greedy answers of llama.cpp (llama-cpp-python) to one question about each image (the benchmark's function)."""
    _llama_cpp()
    from benchmarks.gguf_agreement import llama_cpp_answers as answers

    return answers(model_path, mmproj, questions, image_paths, max_tokens, n_ctx=512, n_threads=2)


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
    # A later round: llama.cpp puts SentencePiece's "▁" before text that follows a special token, so "</s>USER:"
    # becomes "</s> ▁US ER :" where training has "</s> USER :" (known, documented in the README); the rest is equal.
    turns = [("human", "Hi"), ("gpt", "Hello there."), ("human", "What now?")]
    ours = encode_prompt(turns, tok, tmpl, 32000, 1)
    theirs = llm.tokenize(tmpl.prompt(turns).encode(), add_bos=True, special=True)
    k = ours.index(2) + 1
    assert theirs[:k] == ours[:k] and theirs[k + 2:] == ours[k + 1:]
    assert tok.convert_ids_to_tokens(ours[k:k + 1]) == ["USER"]
    assert tok.convert_ids_to_tokens(theirs[k:k + 2]) == ["▁US", "ER"]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """40 held-out coloured-shape images (not the training set) and a question for each."""
    from lora_llava.demo import make_shapes_data

    folder = tmp_path_factory.mktemp("held_out")
    _, eval_json = make_shapes_data(folder, train_samples=0, eval_samples=40, image_size=32, seed=123)
    records = json.loads(eval_json.read_text())
    return folder, [r["conversations"][0]["value"].removeprefix("<image>\n") for r in records], \
        [r["image"] for r in records]


@pytest.fixture(scope="module")
def answering_run(make_recipe):
    """A tiny run trained until it answers ("A red triangle."): the 4-step ``trained_run`` is still near-random, its
    logits so flat that f16 rounding alone changes its greedy tokens (its text-only answers differ from the fp32
    model's as much as llama.cpp's do, while llama.cpp's logits are within 4e-3 of transformers')."""
    _llama_cpp()
    from lora_llava.config.recipe import recipe_from_dict
    from lora_llava.train.sft import train

    raw = make_recipe(model={"attn_implementation": "sdpa"}, quant={"bits": 16}, data={"template": "auto"},
                      train={"stage": 2, "learning_rate": 1e-2, "projector_lr": 1e-2, "max_steps": 80})
    return train(recipe_from_dict(raw))


def _cls_last(embeddings):
    """transformers' CLIP embeddings as llama.cpp's LLaVA graph orders them (llama.cpp issue #25814): the class token
    after the patches, position embeddings 0..n in that order; LLaVA then drops the first row (patch 0, not CLS)."""

    def forward(pixel_values, interpolate_pos_encoding=False, **_):
        patches = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls = embeddings.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([patches, cls], dim=1) + embeddings.position_embedding(embeddings.position_ids)

    return forward


def _image_features(model, pixels, cls_last=False):
    tower = model.model.vision_tower.embeddings
    original = tower.forward
    if cls_last:
        tower.forward = _cls_last(tower)
    try:
        with torch.no_grad():
            out = model.get_image_features(pixel_values=pixels)
    finally:
        tower.forward = original
    out = getattr(out, "pooler_output", out)
    out = torch.cat(list(out)) if isinstance(out, (list, tuple)) else out
    return out.reshape(-1, out.shape[-1]).numpy()


def _llama_cpp_image_features(gguf_dir, rgb: np.ndarray) -> np.ndarray:
    """The image embeddings llama.cpp (mtmd) gives the language model for an RGB image."""
    import ctypes

    llama_cpp = _llama_cpp()
    import llama_cpp.mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=str(gguf_dir / "model-f16.gguf"), n_ctx=512, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu = False
    ctx = mtmd.mtmd_init_from_file(str(gguf_dir / "mmproj-f16.gguf").encode(), llm.model, params)
    try:
        h, w, _ = rgb.shape
        bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * rgb.size).from_buffer(bytearray(rgb.tobytes())))
        chunks = mtmd.mtmd_input_chunks_init()
        text = mtmd.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = \
            MEDIA_MARKER.encode(), len(MEDIA_MARKER), False, True
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                width = llm.n_embd()
                embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * width,))
                return embd.reshape(n, width).copy()
        raise AssertionError("no image chunk")
    finally:
        mtmd.mtmd_free(ctx)


@pytest.fixture(scope="module")
def image_features(gguf_f16, hf_fp32, run16):
    """(llama.cpp's, transformers' LLaVA, transformers' with llama.cpp's CLS order) features of a random square
    image of the tower's size (no padding or resizing on either side)."""
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    rgb = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    model = LlavaForConditionalGeneration.from_pretrained(str(hf_fp32), dtype=torch.float32)
    pixels = run16.processor.image_processor(images=Image.fromarray(rgb), return_tensors="pt").pixel_values
    return _llama_cpp_image_features(gguf_f16, rgb), _image_features(model, pixels), \
        _image_features(model, pixels, cls_last=True)


def test_llama_cpp_computes_our_mmproj_as_its_graph_defines(image_features):
    """The mmproj is read as written: llama.cpp's image embeddings equal transformers' CLIP + projector run in the
    token order of llama.cpp's LLaVA graph, to f16 precision."""
    got, _, cls_last = image_features
    assert got.shape == cls_last.shape == (16, 64)
    np.testing.assert_allclose(got, cls_last, atol=1e-2, rtol=0)


@pytest.mark.xfail(strict=True, reason="llama.cpp (as vendored by llama-cpp-python 0.3.36) appends CLIP's class token "
                   "after the patches in its LLaVA graph while its inputs assume it first (issue #25814, fix in PR "
                   "#25844): every patch gets its neighbour's position embedding, patch 0 is dropped and the class "
                   "token is fed to the LLM. No mmproj can undo that. Passes (and must be un-marked) once fixed.")
def test_llama_cpp_image_features_equal_llava(image_features):
    got, llava, _ = image_features
    np.testing.assert_allclose(got, llava, atol=1e-2, rtol=0)


def test_llama_cpp_answers_like_lora_llava(answering_run, held_out, tmp_path):
    from lora_llava.infer.generate import generate_answers

    out = merge(answering_run.output_dir, tmp_path / "gguf", format="gguf", progress=False).out
    folder, questions, images = held_out
    ours = generate_answers(answering_run.model, answering_run.processor,
                            [[("human", f"<image>\n{q}")] for q in questions], [[i] for i in images], str(folder),
                            template="vicuna_v1", max_new_tokens=12)
    theirs = llama_cpp_answers(out / "model-f16.gguf", out / "mmproj-f16.gguf", questions,
                               [folder / i for i in images])
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"\nllama.cpp f16 vs lora-llava chat: {same}/{len(ours)} greedy answers equal")
    for a, b in zip(ours, theirs, strict=True):
        if a != b:
            print(f"  lora-llava {a!r} | llama.cpp {b!r}")
    assert same >= 0.95 * len(ours)


def test_quantized_variants_through_the_cli(answering_run, held_out, tmp_path, capsys):
    """q8_0 and q4_k_m through `lora-llava merge --format gguf --gguf-quant` (llama.cpp's quantizer); their agreement
    with lora-llava is printed, not asserted: on a 64-wide random model it says little about a real one."""
    from lora_llava.cli.main import main
    from lora_llava.infer.generate import generate_answers

    run = answering_run
    folder, questions, images = held_out
    ours = generate_answers(run.model, run.processor, [[("human", f"<image>\n{q}")] for q in questions],
                            [[i] for i in images], str(folder), template="vicuna_v1", max_new_tokens=12)
    expected = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_k_m": None}
    for quant, qtype in expected.items():
        out = tmp_path / quant
        assert main(["merge", str(run.output_dir), "--format", "gguf", "--gguf-quant", quant, "--out",
                     str(out)]) == 0
        assert f"written to {out} (gguf, {quant})" in capsys.readouterr().out
        assert sorted(p.name for p in out.iterdir()) == ["lora_llava.json", "mmproj-f16.gguf", f"model-{quant}.gguf"]
        types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(out / f"model-{quant}.gguf")).tensors}
        if qtype is not None:
            assert types["blk.0.attn_q.weight"] == qtype
        else:  # 64-wide rows are not a multiple of q4_K's 256: llama.cpp falls back to a 32-block type
            assert types["blk.0.attn_q.weight"] not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
        mm = {t.tensor_type for t in gguf.GGUFReader(str(out / "mmproj-f16.gguf")).tensors}
        assert mm <= {gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32}
        theirs = llama_cpp_answers(out / f"model-{quant}.gguf", out / "mmproj-f16.gguf", questions,
                                   [folder / i for i in images])
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        with capsys.disabled():
            print(f"\nllama.cpp {quant} vs lora-llava chat: {same}/{len(ours)} greedy answers equal "
                  f"(tensor types: {', '.join(f'{k} {v}' for k, v in sorted(_type_counts(types).items()))})")


def _type_counts(types: dict) -> dict:
    counts: dict = {}
    for t in types.values():
        counts[t.name] = counts.get(t.name, 0) + 1
    return counts
