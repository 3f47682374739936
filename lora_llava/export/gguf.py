"""GGUF for llama.cpp: a llava-hf export -> a language-model GGUF and an ``mmproj`` GGUF (vision tower + projector).

Written with the ``gguf`` package in the layout the llama.cpp multimodal loader (``tools/mtmd/clip.cpp``) reads;
the keys and tensor names were learned from llama.cpp's own converter and loader, the code is ours.

Language model (``general.architecture`` ``llama``):

* tensors ``token_embd``, ``blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}``,
  ``output_norm``, ``output``. llama.cpp applies RoPE to adjacent pairs of a head's dimensions, transformers to its
  two halves, so the rows of ``q_proj`` / ``k_proj`` are reordered within each head (first half and second half
  interleaved) — the same model, llama.cpp's convention.
* vocabulary: the Llama-2 SentencePiece pieces with their scores and types, then ``<image>`` (32000) and ``<pad>``
  (32001) as control tokens and ``[PAD32002]`` ... as unused fillers up to the padded embedding size (32064). The ids
  are training's and the embedding / output matrices are written as trained, with no row cut or added; llama.cpp
  never needs ``<image>`` (the image embeddings go in directly) and an unused token is never produced.
* the chat template: vicuna_v1 with llama.cpp's media marker ``<__media__>`` where the image goes; the text after
  the marker is tokenized on its own with SentencePiece's leading ``▁`` — exactly training's ids.

Vision (``general.architecture`` ``clip``, projector type ``mlp`` = LLaVA-1.5's Linear-GELU-Linear ``mm.0`` /
``mm.2``): the CLIP encoder's patch, class and position embeddings, ``pre_ln`` and the encoder blocks up to the
feature layer only (``vision_feature_layer`` -2 = the output of block n-1, written as the non-negative
``clip.vision.feature_layer`` n-1 with n-1 blocks); CLIP's ``post_layernorm`` is not written (LLaVA takes the
hidden state before it). Image size, patch size, mean and std come from the export's image processor. The mmproj
is always f16 (f32 for biases and norms, as llama.cpp's converters do).

Quantized variants (``q8_0``, ``q4_k_m``) are made from the f16 file by llama.cpp's own quantizer
(``llama_model_quantize`` of llama-cpp-python); the vision file stays f16.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MergeError
from ..llava.constants import IMAGE_TOKEN, PAD_TOKEN
from ..llava.tokenizer import llama2_sentencepiece_pieces

logger = logging.getLogger(__name__)

__all__ = ["GGUF_CHAT_TEMPLATE", "GGUF_QUANTS", "MEDIA_MARKER", "check_gguf_tools", "gguf_file_names", "write_gguf"]

GGUF_QUANTS = ("f16", "q8_0", "q4_k_m")
_LLAMA_FTYPE = {"f16": 1, "q8_0": 7, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
MEDIA_MARKER = "<__media__>"
"""Where llama.cpp's multimodal code (mtmd) puts an image in a prompt."""

GGUF_CHAT_TEMPLATE = (
    "{%- set system = 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user\\'s questions.' -%}"
    "{{- system + ' ' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = namespace(v='') -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set text.v = text.v + part['text'] -%}"
    "{%- else -%}{%- set text.v = text.v + '" + MEDIA_MARKER + "' -%}{%- endif -%}{%- endfor -%}"
    "{%- set text = text.v -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' + (text | replace('" + MEDIA_MARKER + "', '" + MEDIA_MARKER + "\\n')) + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + text + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
"""vicuna_v1 for llama.cpp: an image (llama.cpp puts its marker first in the user's text) becomes the marker + ``\\n``,
LLaVA's ``<image>\\n``; the text after it is tokenized separately by mtmd, as training tokenized it."""


def gguf_file_names(quant: str) -> tuple[str, str]:
    """(language model, mmproj) file names in a gguf export."""
    return f"model-{quant}.gguf", "mmproj-f16.gguf"


# --------------------------------------------------------------------------------------------------------------------
# Reading the llava-hf export one tensor at a time.


class _Tensors:
    """Names, shapes and (on demand) data of a llava-hf export's safetensors, one tensor in memory at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.files = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    self.files[key] = path
                    self.shapes[key] = tuple(f.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_tensor(key).float()


def _permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' rotate-half rows of each head -> llama.cpp's interleaved pairs (rows 0, d/2, 1, d/2+1, ...)."""
    head = w.shape[0] // n_head
    return w.reshape(n_head, 2, head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_Plan = list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor] | None, bool]]
"""(gguf name, export key, transform, keep in f32)."""


def _write(path: Path, arch: str, plan: _Plan, tensors: _Tensors, kv: Callable[[Any], None]) -> int:
    """Write a GGUF: metadata (``kv(writer)``), tensor infos, then each tensor's data read, converted and written one
    at a time (the writer never holds the model). Returns the bytes of tensor data."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    kv(writer)
    for name, key, _, f32 in plan:
        shape = tensors.shapes[key]
        dtype = np.float32 if f32 else np.float16
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = 0
    for _name, key, transform, f32 in plan:
        t = tensors.get(key)
        if transform is not None:
            t = transform(t)
        data = t.numpy().astype(np.float32 if f32 else np.float16)
        writer.write_tensor_data(data)
        total += data.nbytes
        del t, data
    writer.close()
    return total


# --------------------------------------------------------------------------------------------------------------------
# The language model.


def _text_config(config: dict) -> dict:
    text = config["text_config"]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise MergeError(f"--format gguf: rope scaling {rope} is not supported (only Llama's plain RoPE)")
    return text


def _vocab(vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    pieces = llama2_sentencepiece_pieces()
    tokens = [p.encode() for p, _, _ in pieces]
    scores = [s for _, s, _ in pieces]
    types = [t for _, _, t in pieces]
    extra = [IMAGE_TOKEN, PAD_TOKEN]
    for i in range(len(tokens), vocab_size):
        j = i - len(pieces)
        tokens.append((extra[j] if j < len(extra) else f"[PAD{i}]").encode())
        scores.append(-1000.0)
        types.append(3 if j < len(extra) else 5)  # control / unused
    return tokens, scores, types


def _write_language_model(path: Path, config: dict, tensors: _Tensors, tokenizer, name: str) -> int:
    text = _text_config(config)
    n_head = text["num_attention_heads"]
    n_kv = text.get("num_key_value_heads") or n_head
    hidden = text["hidden_size"]
    head_dim = text.get("head_dim") or hidden // n_head
    vocab = tensors.shapes["language_model.model.embed_tokens.weight"][0]
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != 32000 or tokenizer.convert_tokens_to_ids(PAD_TOKEN) != 32001:
        raise MergeError("--format gguf needs the Llama-2 vocabulary with <image> = 32000 and <pad> = 32001")
    rope = text.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", text.get("rope_theta", 10000.0)))

    def kv(w) -> None:
        import gguf

        w.add_name(name)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_file_type(_LLAMA_FTYPE["f16"])
        w.add_context_length(text.get("max_position_embeddings", 4096))
        w.add_embedding_length(hidden)
        w.add_block_count(text["num_hidden_layers"])
        w.add_feed_forward_length(text["intermediate_size"])
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(float(text.get("rms_norm_eps", 1e-5)))
        w.add_vocab_size(vocab)
        tokens, scores, types = _vocab(vocab)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(tokenizer.bos_token_id)
        w.add_eos_token_id(tokenizer.eos_token_id)
        w.add_unk_token_id(tokenizer.unk_token_id)
        w.add_pad_token_id(tokenizer.pad_token_id)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(True)
        w.add_chat_template(GGUF_CHAT_TEMPLATE)

    lm = "language_model.model."
    plan: _Plan = [("token_embd.weight", lm + "embed_tokens.weight", None, False)]
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(text["num_hidden_layers"]):
        for hf, gg in parts.items():
            key = f"{lm}layers.{i}.{hf}.weight"
            transform = None
            if gg == "attn_q":
                transform = lambda t: _permute_rope(t, n_head)  # noqa: E731
            elif gg == "attn_k":
                transform = lambda t: _permute_rope(t, n_kv)  # noqa: E731
            plan.append((f"blk.{i}.{gg}.weight", key, transform, gg.endswith("norm")))
        for bias in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if f"{lm}layers.{i}.self_attn.{bias}.bias" in tensors.shapes:
                raise MergeError("--format gguf: attention biases are not supported (Llama has none)")
    plan.append(("output_norm.weight", lm + "norm.weight", None, True))
    plan.append(("output.weight", "language_model.lm_head.weight", None, False))
    return _write(path, "llama", plan, tensors, kv)


# --------------------------------------------------------------------------------------------------------------------
# The vision tower and projector (mmproj).


def _feature_layer(config: dict, n_layers: int) -> int:
    layer = config.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise MergeError(f"--format gguf: vision_feature_layer {layer} (several layers) is not supported")
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise MergeError("--format gguf: only the 'default' feature strategy (CLS dropped, LLaVA-1.5) is supported")
    # hidden_states[0] is the embeddings (after pre_ln), hidden_states[k] the output of block k-1.
    return layer if layer >= 0 else n_layers + 1 + layer


def _write_mmproj(path: Path, config: dict, tensors: _Tensors, image_processor, name: str) -> int:
    vision = config["vision_config"]
    n_layers = vision["num_hidden_layers"]
    feature = _feature_layer(config, n_layers)
    act = vision.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise MergeError(f"--format gguf: vision hidden_act {act!r} is not supported (quick_gelu or gelu)")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise MergeError("--format gguf: llama.cpp's LLaVA projector is Linear-GELU-Linear; this one is "
                         f"{config.get('projector_hidden_act')}")
    size = image_processor.crop_size["height"] if getattr(image_processor, "crop_size", None) else \
        vision["image_size"]
    hidden, ff = vision["hidden_size"], vision["intermediate_size"]

    def kv(w) -> None:
        import gguf

        w.add_name(name)
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_file_type(_LLAMA_FTYPE["f16"])
        w.add_description("image encoder for LLaVA-1.5 (lora-llava)")
        w.add_bool("clip.has_text_encoder", False)
        w.add_clip_has_vision_encoder(True)
        w.add_bool("clip.has_llava_projector", True)
        w.add_clip_projector_type("mlp")
        w.add_vision_image_size(size)
        w.add_vision_patch_size(vision["patch_size"])
        w.add_vision_embedding_length(hidden)
        w.add_vision_feed_forward_length(ff)
        w.add_vision_projection_dim(config["text_config"]["hidden_size"])
        w.add_vision_block_count(feature)
        w.add_vision_head_count(vision["num_attention_heads"])
        w.add_vision_attention_layernorm_eps(float(vision.get("layer_norm_eps", 1e-5)))
        w.add_vision_image_mean([float(x) for x in image_processor.image_mean])
        w.add_vision_image_std([float(x) for x in image_processor.image_std])
        w.add_array("clip.vision.feature_layer", [feature])
        w.add_vision_use_gelu(act == "gelu")

    v = "vision_tower.vision_model."
    plan: _Plan = [
        ("v.patch_embd.weight", v + "embeddings.patch_embedding.weight", None, False),
        ("v.class_embd", v + "embeddings.class_embedding", None, True),
        ("v.position_embd.weight", v + "embeddings.position_embedding.weight", None, False),
        ("v.pre_ln.weight", v + "pre_layrnorm.weight", None, True),
        ("v.pre_ln.bias", v + "pre_layrnorm.bias", None, True),
    ]
    # clip.cpp swaps ffn_up / ffn_down of an "mlp" mmproj whose ffn_down has n_embd columns (old files named fc1
    # ffn_down); when fc2 has n_embd columns too (intermediate == hidden), only the old naming reads back right.
    up, down = ("ffn_down", "ffn_up") if ff == hidden else ("ffn_up", "ffn_down")
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2", "mlp.fc1": up,
             "mlp.fc2": down}
    for i in range(feature):
        for hf, gg in parts.items():
            for param in ("weight", "bias"):
                f32 = param == "bias" or gg.startswith("ln")
                plan.append((f"v.blk.{i}.{gg}.{param}", f"{v}encoder.layers.{i}.{hf}.{param}", None, f32))
    for index, layer in (("0", "linear_1"), ("2", "linear_2")):
        plan.append((f"mm.{index}.weight", f"multi_modal_projector.{layer}.weight", None, False))
        plan.append((f"mm.{index}.bias", f"multi_modal_projector.{layer}.bias", None, True))
    missing = [key for _, key, _, _ in plan if key not in tensors.shapes]
    if missing:
        raise MergeError(f"--format gguf: the export lacks {missing[:3]} (not a CLIP vision tower?)")
    return _write(path, "clip", plan, tensors, kv)


# --------------------------------------------------------------------------------------------------------------------
# Quantizing with llama.cpp.


def _quantize(src: Path, dst: Path, quant: str) -> None:
    try:
        import llama_cpp
    except ImportError as e:
        raise MergeError(f"--gguf-quant {quant} quantizes with llama.cpp's own quantizer: pip install "
                         f"llama-cpp-python ({e})") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _LLAMA_FTYPE[quant]
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise MergeError(f"llama.cpp's quantizer failed on {src.name} -> {quant} (return code {rc})")


def check_gguf_tools(quant: str) -> None:
    """Fail before any work when the packages ``--gguf-quant quant`` needs are missing."""
    if quant not in GGUF_QUANTS:
        raise MergeError(f"--gguf-quant {quant!r}: choose one of {', '.join(GGUF_QUANTS)}")
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise MergeError("--format gguf writes with the gguf package: pip install 'lora-llava[gguf]'")
    if quant != "f16" and importlib.util.find_spec("llama_cpp") is None:
        raise MergeError(f"--gguf-quant {quant} quantizes with llama.cpp's own quantizer: pip install "
                         "llama-cpp-python (or 'lora-llava[gguf]')")


def write_gguf(hf_export: Path, out: Path, quant: str = "f16", name: str = "lora-llava") -> int:
    """Write ``model-{quant}.gguf`` and ``mmproj-f16.gguf`` for the llava-hf export ``hf_export`` into the existing
    folder ``out``; returns the bytes written."""
    from transformers import AutoProcessor

    if quant not in GGUF_QUANTS:
        raise MergeError(f"--gguf-quant {quant!r}: choose one of {', '.join(GGUF_QUANTS)}")
    check_gguf_tools(quant)
    config = json.loads((hf_export / "config.json").read_text())
    processor = AutoProcessor.from_pretrained(str(hf_export))
    tensors = _Tensors(hf_export)
    lm_name, mmproj_name = gguf_file_names(quant)
    f16 = out / gguf_file_names("f16")[0]
    _write_language_model(f16, config, tensors, processor.tokenizer, name)
    _write_mmproj(out / mmproj_name, config, tensors, processor.image_processor, name)
    if quant != "f16":
        _quantize(f16, out / lm_name, quant)
        f16.unlink()
    return sum(p.stat().st_size for p in out.glob("*.gguf"))
