"""Tiny checkpoints in the file layouts and config key sets of the published ones (the shapes are tiny, the names,
files and formats are the real ones):

- ``vicuna``: lmsys/vicuna-7b-v1.5 — ``tokenizer.model`` + ``tokenizer_config.json`` (no ``tokenizer.json``),
  float16 ``pytorch_model-0000N-of-00002.bin`` shards + ``pytorch_model.bin.index.json``.
- ``clip_bin`` / ``clip_safetensors``: openai/clip-vit-large-patch14-336 — a full ``CLIPModel`` (text tower too) with
  its ``position_ids`` buffers, the ``*_config_dict`` config keys, CLIP's BPE tokenizer files and
  ``preprocessor_config.json``; as ``pytorch_model.bin`` and as ``model.safetensors``.
- ``llava_hf``: llava-hf/llava-1.5-7b-hf — float16 safetensors shards + index under the transformers-4.36 names
  (``language_model.model.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_1/2``), vocabulary
  32064, ``preprocessor_config.json`` (``CLIPImageProcessor``: resize + centre crop), ``processor_config.json``,
  ``chat_template.json``, tokenizer with ``<image>`` 32000 and ``<pad>`` 32001 (``added_tokens.json``).
- ``original``: liuhaotian/llava-v1.5-7b — ``model_type: llava`` with the ``mm_*`` keys and
  ``mm_vision_tower: openai/clip-vit-large-patch14-336``, float16 ``.bin`` shards that also carry the tower as
  ``model.vision_tower.vision_tower.*``, the Vicuna tokenizer files.
- ``mm_projector``: the stage-1 release's ``mm_projector.bin`` (``model.mm_projector.{0,2}.{weight,bias}``, bfloat16).

All five hold the same weights, so a model assembled from any of them is the same model. :func:`build_next` adds the
LLaVA-NeXT (1.6) layouts of the same weights.

:func:`build_v1` writes the original LLaVA (v1) release's layout (linear ``model.mm_projector``,
``mm_use_im_start_end``, 32003 rows) and v1's stage-1 ``mm_projector.bin``, with weights of their own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE, PATCH = 32, 8
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4}
VISION = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": IMAGE, "patch_size": PATCH, "projection_dim": 32}
CLIP_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
             "projection_dim": 32}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VICUNA_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": {"__type": "AddedToken", "content": "<s>",
    "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}, "clean_up_tokenization_spaces": False,
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False}, "legacy": False, "model_max_length": 4096, "pad_token": None,
    "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False}}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _save_shards(state: dict[str, torch.Tensor], folder: Path, kind: str, shards: int) -> None:
    """``kind``: ``bin`` (torch.save, pytorch_model-0000N-of-0000M.bin) or ``safetensors`` (model-0000N-of-...)."""
    from safetensors.torch import save_file

    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for n in range(shards):
        part = {k: state[k].contiguous() for k in names[n * per:(n + 1) * per]}
        stem = "pytorch_model" if kind == "bin" else "model"
        file = f"{stem}-{n + 1:05d}-of-{shards:05d}.{kind}"
        if kind == "bin":
            torch.save(part, folder / file)
        else:
            save_file(part, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = "pytorch_model.bin.index.json" if kind == "bin" else "model.safetensors.index.json"
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _write(folder: Path, name: str, data) -> None:
    (folder / name).write_text(json.dumps(data, indent=2))


def _vicuna_tokenizer_files(folder: Path) -> None:
    from lora_llava.llava.tokenizer import sentencepiece_model_bytes

    (folder / "tokenizer.model").write_bytes(sentencepiece_model_bytes())
    _write(folder, "tokenizer_config.json", VICUNA_TOKENIZER_CONFIG)
    _write(folder, "special_tokens_map.json", SPECIAL_TOKENS_MAP)


def _llama_config() -> dict:
    return {"_name_or_path": "vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
            "eos_token_id": 2, "hidden_act": "silu", **TEXT, "initializer_range": 0.02, "max_position_embeddings": 4096,
            "model_type": "llama", "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
            "transformers_version": "4.31.0", "use_cache": True, "vocab_size": 32000}


def _clip_sub_config(values: dict, model_type: str) -> dict:
    # The openai configs spell out every PretrainedConfig default in text_config / vision_config.
    common = {"add_cross_attention": False, "architectures": None, "attention_dropout": 0.0, "bad_words_ids": None,
              "chunk_size_feed_forward": 0, "diversity_penalty": 0.0, "do_sample": False, "dropout": 0.0,
              "early_stopping": False, "hidden_act": "quick_gelu", "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
              "initializer_factor": 1.0, "initializer_range": 0.02, "is_decoder": False, "is_encoder_decoder": False,
              "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "layer_norm_eps": 1e-05, "length_penalty": 1.0,
              "max_length": 20, "min_length": 0, "model_type": model_type, "num_beams": 1, "output_attentions": False,
              "output_hidden_states": False, "pruned_heads": {}, "return_dict": True, "temperature": 1.0,
              "tie_word_embeddings": True, "top_k": 50, "top_p": 1.0, "torch_dtype": None, "torchscript": False,
              "use_bfloat16": False}
    return {**common, **values}


def build(root: Path) -> dict[str, Path]:
    """Write the five checkpoints under ``root``; returns their paths by name."""
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    from lora_llava.model.loading import added_rows

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32000, max_position_embeddings=256, initializer_range=0.1, **TEXT))
    clip = CLIPModel(CLIPConfig(text_config=CLIP_TEXT, vision_config=VISION, projection_dim=32))
    projector = {"0.weight": torch.randn(TEXT["hidden_size"], VISION["hidden_size"]) * 0.2,
                 "0.bias": torch.randn(TEXT["hidden_size"]) * 0.2,
                 "2.weight": torch.randn(TEXT["hidden_size"], TEXT["hidden_size"]) * 0.2,
                 "2.bias": torch.randn(TEXT["hidden_size"]) * 0.2}
    # Values every file format holds exactly (the releases mix float16, bfloat16 and float32), so the layouts load to
    # the same model bit for bit.
    with torch.no_grad():
        for p in clip.parameters():
            p.copy_(p.half().float())
        projector = {k: v.to(torch.bfloat16).float() for k, v in projector.items()}
    half = {k: v.to(torch.float16) for k, v in llm.state_dict().items()}
    clip_state = dict(clip.state_dict())
    clip_state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    clip_state["vision_model.embeddings.position_ids"] = torch.arange((IMAGE // PATCH) ** 2 + 1).unsqueeze(0)
    tower = {k: v for k, v in clip_state.items() if k.startswith("vision_model.") and not k.endswith("position_ids")}
    paths = {name: root / name for name in ("vicuna", "clip_bin", "clip_safetensors", "llava_hf", "original")}
    for p in paths.values():
        p.mkdir(parents=True)

    # lmsys/vicuna-7b-v1.5
    _save_shards(half, paths["vicuna"], "bin", 2)
    _write(paths["vicuna"], "config.json", _llama_config())
    _write(paths["vicuna"], "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096,
                                                       "pad_token_id": 0, "temperature": 0.9, "top_p": 0.6,
                                                       "transformers_version": "4.31.0"})
    _vicuna_tokenizer_files(paths["vicuna"])

    # openai/clip-vit-large-patch14-336
    from safetensors.torch import save_file
    from transformers import CLIPTokenizer

    clip_config = {
        "_name_or_path": "openai/clip-vit-large-patch14-336", "architectures": ["CLIPModel"],
        "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": 32,
        "text_config": _clip_sub_config({**CLIP_TEXT, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                                         "max_position_embeddings": 77, "vocab_size": 49408}, "clip_text_model"),
        "text_config_dict": CLIP_TEXT,
        "torch_dtype": "float32", "transformers_version": None,
        "vision_config": _clip_sub_config({**VISION, "num_channels": 3}, "clip_vision_model"),
        "vision_config_dict": VISION}
    preprocessor = {"crop_size": IMAGE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
                    "resample": 3, "size": IMAGE}
    for name in ("clip_bin", "clip_safetensors"):
        folder = paths[name]
        if name == "clip_bin":
            torch.save(clip_state, folder / "pytorch_model.bin")
        else:
            save_file({k: v.contiguous() for k, v in clip_state.items()}, str(folder / "model.safetensors"),
                      metadata={"format": "pt"})
        _write(folder, "config.json", clip_config)
        _write(folder, "preprocessor_config.json", preprocessor)
        # CLIP's tokenizer files (a tiny BPE vocabulary; the LLaVA path never uses the text tower's tokenizer).
        _write(folder, "vocab.json", {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "!": 3})
        (folder / "merges.txt").write_text("#version: 0.2\n")
        _write(folder, "special_tokens_map.json", {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                                                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
        _write(folder, "tokenizer_config.json", {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                 "do_lower_case": True, "errors": "replace"})
        assert CLIPTokenizer.from_pretrained(str(folder))  # the tokenizer files are readable

    # llava-hf/llava-1.5-7b-hf: vocabulary padded to 32064; <image> and <pad> rows as the llava-hf conversion
    # gives them (here: the mean rows of the base, as lora-llava makes them).
    embed, head = half["model.embed_tokens.weight"].float(), half["lm_head.weight"].float()
    hf_state = {"language_model.model.embed_tokens.weight": torch.cat([embed, added_rows(embed, 64)]).half(),
                "language_model.lm_head.weight": torch.cat([head, added_rows(head, 64)]).half()}
    hf_state.update({f"language_model.{k}": v for k, v in half.items()
                     if k not in ("model.embed_tokens.weight", "lm_head.weight")})
    hf_state.update({f"vision_tower.{k}": v.half() for k, v in tower.items()})
    hf_state.update({f"multi_modal_projector.linear_{1 if k[0] == '0' else 2}.{k[2:]}": v.half()
                     for k, v in projector.items()})
    _save_shards(hf_state, paths["llava_hf"], "safetensors", 3)
    _write(paths["llava_hf"], "config.json", {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], **TEXT,
                        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                        "torch_dtype": "float16", "vocab_size": 32064},
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": {**VISION, "model_type": "clip_vision_model", "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064})
    _write(paths["llava_hf"], "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001,
                                                         "transformers_version": "4.36.0.dev0"})
    _write(paths["llava_hf"], "preprocessor_config.json", {
        "crop_size": {"height": IMAGE, "width": IMAGE}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": IMAGE}})
    _write(paths["llava_hf"], "processor_config.json", {"image_token": "<image>", "num_additional_image_tokens": 1,
                                                        "patch_size": PATCH, "processor_class": "LlavaProcessor",
                                                        "vision_feature_select_strategy": "default"})
    # The published template puts "<image>\n" before the text and no system prompt (written here in our words).
    _write(paths["llava_hf"], "chat_template.json", {"chat_template": (
        "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
        "{% for c in m['content'] if c['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
        "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")})
    _vicuna_tokenizer_files(paths["llava_hf"])
    from lora_llava.llava.tokenizer import load_tokenizer

    tok = load_tokenizer()  # the Llama-2 vocabulary + <image> 32000 + <pad> 32001
    tok.save_pretrained(str(paths["llava_hf"] / "_fast"))
    (paths["llava_hf"] / "_fast" / "tokenizer.json").replace(paths["llava_hf"] / "tokenizer.json")
    _write(paths["llava_hf"], "added_tokens.json", {"<image>": 32000, "<pad>": 32001})
    added = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, c in ((0, "<unk>"), (1, "<s>"), (2, "</s>"), (32000, "<image>"),
                                                    (32001, "<pad>"))}
    _write(paths["llava_hf"], "tokenizer_config.json", {**VICUNA_TOKENIZER_CONFIG, "added_tokens_decoder": added,
                                                        "pad_token": "<pad>", "processor_class": "LlavaProcessor"})
    _write(paths["llava_hf"], "special_tokens_map.json", {**SPECIAL_TOKENS_MAP, "pad_token": "<pad>"})
    for f in (paths["llava_hf"] / "_fast").iterdir():
        f.unlink()
    (paths["llava_hf"] / "_fast").rmdir()

    # liuhaotian/llava-v1.5-7b
    original = dict(half)
    original.update({f"model.mm_projector.{k}": v.half() for k, v in projector.items()})
    original.update({f"model.vision_tower.vision_tower.{k}": v.half() for k, v in tower.items()})
    _save_shards(original, paths["original"], "bin", 2)
    _write(paths["original"], "config.json", {
        **{k: v for k, v in _llama_config().items() if k != "_name_or_path"},
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "image_grid_pinpoints": None, "max_length": 4096,
        "mm_hidden_size": VISION["hidden_size"], "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None, "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava", "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False, "unfreeze_mm_vision_tower": False, "use_mm_proj": True})
    _write(paths["original"], "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "max_length": 4096,
                                                         "pad_token_id": 0, "transformers_version": "4.31.0"})
    _vicuna_tokenizer_files(paths["original"])
    _write(paths["original"], "tokenizer_config.json", {**VICUNA_TOKENIZER_CONFIG, "pad_token": "<unk>"})

    # liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin
    paths["mm_projector"] = root / "pretrain" / "mm_projector.bin"
    paths["mm_projector"].parent.mkdir()
    torch.save({f"model.mm_projector.{k}": v.to(torch.bfloat16) for k, v in projector.items()}, paths["mm_projector"])
    return paths


# LLaVA-NeXT (LLaVA-1.6): the resolutions the 1.6 releases list, scaled to the tiny tower's tile.
NEXT_PINPOINTS = [[IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE], [2 * IMAGE, 2 * IMAGE], [3 * IMAGE, IMAGE],
                  [IMAGE, 3 * IMAGE]]


def build_next(root: Path, paths: dict[str, Path]) -> dict[str, Path]:
    """LLaVA-NeXT checkpoints from the weights :func:`build` wrote (``paths``), plus one ``image_newline``:

    - ``llava_next_hf``: llava-hf/llava-v1.6-vicuna-7b-hf — the llava-hf files with ``model_type: llava_next``,
      ``image_grid_pinpoints``, ``use_image_newline_parameter``, a top-level ``image_newline`` tensor,
      ``LlavaNextImageProcessor`` / ``LlavaNextProcessor`` configs.
    - ``original_next``: liuhaotian/llava-v1.6-vicuna-7b — the original layout with ``image_aspect_ratio: anyres``,
      ``mm_patch_merge_type: spatial_unpad``, ``image_grid_pinpoints``, ``unfreeze_mm_vision_tower: true`` (1.6 trained
      its tower, so the shards carry it), ``model.image_newline``, safetensors shards.
    - ``next_projector``: a lora-llava NeXT stage-1 ``projector.safetensors`` (projector + ``image_newline``).

    All hold the weights of :func:`build`'s checkpoints, so every way of loading gives the same NeXT model.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    torch.manual_seed(1)
    newline = (torch.randn(TEXT["hidden_size"]) * 0.5).half()
    out = {name: root / name for name in ("llava_next_hf", "original_next")}

    hf = out["llava_next_hf"]
    shutil.copytree(paths["llava_hf"], hf)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shard = load_file(str(hf / first))
    shard["image_newline"] = newline
    save_file(shard, str(hf / first), metadata={"format": "pt"})
    index["weight_map"]["image_newline"] = first
    (hf / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((hf / "config.json").read_text())
    config.update(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next",
                  image_grid_pinpoints=NEXT_PINPOINTS, use_image_newline_parameter=True)
    _write(hf, "config.json", config)
    _write(hf, "preprocessor_config.json", {
        "aspect_ratio_setting": "anyres", "crop_size": {"height": IMAGE, "width": IMAGE}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": NEXT_PINPOINTS, "image_mean": CLIP_MEAN, "image_processor_type":
        "LlavaNextImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaNextProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": IMAGE}})
    _write(hf, "processor_config.json", {"image_token": "<image>", "num_additional_image_tokens": 1,
                                         "patch_size": PATCH, "processor_class": "LlavaNextProcessor",
                                         "vision_feature_select_strategy": "default"})
    tok_config = json.loads((hf / "tokenizer_config.json").read_text())
    _write(hf, "tokenizer_config.json", {**tok_config, "processor_class": "LlavaNextProcessor"})

    original = out["original_next"]
    original.mkdir()
    state = {}
    for file in sorted(paths["original"].glob("pytorch_model-*.bin")):
        state.update(torch.load(file, weights_only=True))
    state["model.image_newline"] = newline
    _save_shards(state, original, "safetensors", 2)
    for name in ("generation_config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(paths["original"] / name, original / name)
    config = json.loads((paths["original"] / "config.json").read_text())
    config.update(image_aspect_ratio="anyres", image_grid_pinpoints=NEXT_PINPOINTS, mm_patch_merge_type="spatial_unpad",
                  unfreeze_mm_vision_tower=True, mm_vision_tower_lr=2e-06, image_crop_resolution=None,
                  image_split_resolution=None, _name_or_path="./checkpoints/vicuna-7b-v1-5")
    _write(original, "config.json", config)

    projector = {k.replace("model.mm_projector.0.", "multi_modal_projector.linear_1.")
                 .replace("model.mm_projector.2.", "multi_modal_projector.linear_2."): v.float()
                 for k, v in state.items() if k.startswith("model.mm_projector.")}
    projector["image_newline"] = newline.float()
    out["next_projector"] = root / "next_stage1" / "projector.safetensors"
    out["next_projector"].parent.mkdir()
    save_file(projector, str(out["next_projector"]))
    return out


def build_v1(root: Path, tower: Path) -> dict[str, Path]:
    """The original LLaVA (v1) release's layout (liuhaotian/LLaVA-13b-delta-v0 as applied, April 2023), tiny:
    ``model_type: llava`` without ``mm_projector_type`` (v1 had only its linear projector), ``mm_use_im_start_end:
    true``, ``mm_vision_tower: openai/clip-vit-large-patch14``, ``pad_token_id: -1``, a vocabulary of 32003 rows
    (``<im_patch>`` 32000, ``<im_start>`` 32001, ``<im_end>`` 32002 in ``added_tokens.json``), the projector as one
    ``model.mm_projector.{weight,bias}``; and v1's stage-1 ``mm_projector.bin``, which keeps the whole input
    embedding next to the projector. ``tower`` is a CLIP checkpoint of :func:`build` (model.vision_tower points at it).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32003, max_position_embeddings=256, initializer_range=0.1, **TEXT))
    state = {k: v.to(torch.float16) for k, v in llm.state_dict().items()}
    projector = {"weight": (torch.randn(TEXT["hidden_size"], VISION["hidden_size"]) * 0.2).half(),
                 "bias": (torch.randn(TEXT["hidden_size"]) * 0.2).half()}
    paths = {"original_v1": root / "original_v1", "mm_projector_v1": root / "pretrain_v1" / "mm_projector.bin"}
    folder = paths["original_v1"]
    folder.mkdir(parents=True)
    paths["mm_projector_v1"].parent.mkdir(parents=True)
    original = dict(state)
    original.update({f"model.mm_projector.{k}": v for k, v in projector.items()})
    _save_shards(original, folder, "bin", 2)
    _write(folder, "config.json", {
        "_name_or_path": "./checkpoints/llava-13b-v0", "architectures": ["LlavaLlamaForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", **TEXT, "initializer_range": 0.02, "max_sequence_length": 2048,
        "max_position_embeddings": 2048, "mm_hidden_size": VISION["hidden_size"], "mm_use_im_start_end": True,
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14", "model_type": "llava",
        "pad_token_id": -1, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.28.0.dev0", "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True,
        "vocab_size": 32003})
    _vicuna_tokenizer_files(folder)
    _write(folder, "added_tokens.json", {"<im_patch>": 32000, "<im_start>": 32001, "<im_end>": 32002})
    torch.save({"model.mm_projector.weight": projector["weight"].to(torch.bfloat16),
                "model.mm_projector.bias": projector["bias"].to(torch.bfloat16),
                "model.embed_tokens.weight": state["model.embed_tokens.weight"].to(torch.bfloat16)},
               paths["mm_projector_v1"])
    paths["tower"] = tower
    return paths
