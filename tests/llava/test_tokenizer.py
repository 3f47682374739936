"""The tokenizer training uses tokenizes like SentencePiece, which is what the LLaVA reference trained with
(``use_fast=False``): checked against the real ``sentencepiece`` library on the shipped Llama-2 model."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from lora_llava.llava.tokenizer import (
    SENTENCEPIECE_MODEL,
    encode_like_sentencepiece,
    is_llama2_sentencepiece,
    load_folder_tokenizer,
    sentencepiece_model_bytes,
)

ROOT = Path(__file__).parents[2]
GGUF = ROOT.parent / "shared/assets/llama-tokenizer/ggml-vocab-llama-spm.gguf"

# Vicuna-7b-v1.5's tokenizer_config.json as published (the file that sits next to tokenizer.model).
VICUNA_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
    "eos_token": "</s>", "legacy": False, "model_max_length": 4096, "pad_token": None, "padding_side": "right",
    "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}


@pytest.fixture(scope="module")
def sp():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model_bytes())


def _texts(n: int, seed: int = 0) -> list[str]:
    # Special-token strings (<s>, </s>, <unk>) are left out: raw SentencePiece reads them as text, transformers'
    # tokenizers (slow and fast alike, and so the reference) as the special tokens.
    parts = [" ", "  ", "   ", "\n", "\t", "\r", "a", "the", "cat", "12", "2024", "é", "数字", "🙂", ".", "?", "\u2581",
             "USER:", "ASSISTANT:", "ﬁ", "\u00a0", "\u3000", "<", "image>"]
    rnd = random.Random(seed)
    return ["".join(rnd.choice(parts) for _ in range(rnd.randint(0, 9))) for _ in range(n)]


def test_shipped_tokenizer_gives_sentencepiece_ids(vicuna_tokenizer, sp):
    texts = _texts(3000) + [" leading", "  two  spaces", "   ", "\n What is in the image?", "trailing  "]
    wrong = [t for t in texts if encode_like_sentencepiece(vicuna_tokenizer, t, False)["input_ids"] != sp.encode(t)]
    assert wrong == []


def test_leading_space_keeps_sentencepiece_boundary_piece(vicuna_tokenizer):
    enc = encode_like_sentencepiece(vicuna_tokenizer, " leading", add_special_tokens=True)
    assert enc["input_ids"] == [1, 29871, 8236]  # <s> ▁ ▁leading, as SentencePiece and the reference
    # Offsets are those of the text given, not of the padded one.
    assert enc["offset_mapping"] == [(0, 0), (0, 0), (0, 8)]
    # A plain tokenizer call drops the boundary piece; that is what encode_like_sentencepiece corrects.
    assert vicuna_tokenizer(" leading").input_ids == [1, 8236]


def _vicuna_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(sentencepiece_model_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(VICUNA_TOKENIZER_CONFIG))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


def test_tokenizer_model_only_folder_tokenizes_like_sentencepiece(tmp_path, sp):
    tokenizer = load_folder_tokenizer(_vicuna_folder(tmp_path / "vicuna-7b-v1.5"))
    assert len(tokenizer) == 32000 and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert tokenizer.model_max_length == 4096
    # Whitespace runs inside a text: SentencePiece's split, which transformers' own conversion does not give.
    for text in ["two  spaces", "a   b  c", "USER: hi  there"]:
        assert tokenizer(text).input_ids == [1] + sp.encode(text), text


def test_other_tokenizer_model_is_converted_with_a_warning(tmp_path, caplog):
    from sentencepiece import sentencepiece_model_pb2 as pb

    folder = _vicuna_folder(tmp_path / "other")
    model = pb.ModelProto()
    model.ParseFromString(sentencepiece_model_bytes())
    model.pieces[500].score -= 1.0  # another vocabulary
    (folder / "tokenizer.model").write_bytes(model.SerializeToString())
    assert not is_llama2_sentencepiece(folder / "tokenizer.model")
    with caplog.at_level("WARNING"):
        tokenizer = load_folder_tokenizer(folder)
    assert len(tokenizer) == 32000
    assert "not the Llama-2 vocabulary" in caplog.text


def test_shipped_tokenizer_model_rebuilds_from_llama_cpp_vocabulary(tmp_path):
    """Provenance: tools/build_tokenizer_model.py turns llama.cpp's gguf vocabulary into the shipped bytes."""
    if not GGUF.is_file():
        pytest.skip(f"the source vocabulary {GGUF} is not on this machine")
    pytest.importorskip("gguf")
    import subprocess
    import sys

    out = tmp_path / SENTENCEPIECE_MODEL
    subprocess.run([sys.executable, str(ROOT / "tools/build_tokenizer_model.py"), str(GGUF), str(out)], check=True,
                   capture_output=True)
    assert out.read_bytes() == sentencepiece_model_bytes()
    assert is_llama2_sentencepiece(out)


def test_copied_model_file_is_recognised(tmp_path):
    shutil.copyfile(ROOT / "lora_llava/assets" / SENTENCEPIECE_MODEL, tmp_path / "tokenizer.model")
    assert is_llama2_sentencepiece(tmp_path / "tokenizer.model")
    (tmp_path / "broken.model").write_bytes(b"not a model")
    assert not is_llama2_sentencepiece(tmp_path / "broken.model")
