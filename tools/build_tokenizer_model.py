"""Rebuild ``lora_llava/assets/llama2-tokenizer.model``: the Llama-2 / Vicuna-v1.5 SentencePiece model, made from the
vocabulary in llama.cpp's ``ggml-vocab-llama-spm.gguf`` (pieces, scores and piece types, 1:1) plus the trainer and
normaliser settings of Meta's Llama-2 tokenizer (BPE, byte fallback, digits split, identity normaliser, a dummy
prefix, whitespace runs kept).

    python tools/build_tokenizer_model.py GGUF [OUT]

Needs the ``gguf``, ``sentencepiece`` and ``protobuf`` packages. The output is deterministic: rebuilding gives the same
bytes (``tests/llava/test_tokenizer_model.py`` checks it when the gguf file is at hand).
"""

from __future__ import annotations

import sys
from pathlib import Path


def build(gguf_path: str | Path) -> bytes:
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = GGUFReader(str(gguf_path))

    def field(name: str) -> list:
        f = reader.fields[name]
        return [f.parts[i] for i in f.data]

    if str(bytes(field("tokenizer.ggml.model")[0]), "utf-8") != "llama":
        raise SystemExit(f"{gguf_path}: not a SentencePiece (llama) vocabulary")
    tokens = [bytes(t).decode("utf-8") for t in field("tokenizer.ggml.tokens")]
    scores = [float(s[0]) for s in field("tokenizer.ggml.scores")]
    types = [int(t[0]) for t in field("tokenizer.ggml.token_type")]  # gguf's token types are SentencePiece's
    model = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        p = model.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    spec.max_sentencepiece_length = 16
    spec.split_by_unicode_script = True
    spec.split_by_whitespace = True
    spec.allow_whitespace_only_pieces = True
    spec.unk_surface = " \u2047 "
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1] if len(argv) == 2 else Path(__file__).parents[1] / "lora_llava/assets/llama2-tokenizer.model")
    data = build(argv[0])
    tmp = out.with_name(out.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(out)
    print(f"wrote {out} ({len(data):,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
