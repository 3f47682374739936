"""The checkpoint layouts lora-llava reads and writes, and the one table of tensor names between them.

Layouts (what :func:`checkpoint_layout` tells from a ``config.json``):

* ``llava-hf``: transformers' ``LlavaForConditionalGeneration`` (``llava-hf/llava-1.5-13b-hf``). On the Hub its
  tensors are ``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.vision_model.*`` and
  ``multi_modal_projector.linear_{1,2}.*``; transformers 5 itself saves them under ``model.*``.
* ``llava-original``: the LLaVA reference (``liuhaotian/llava-v1.5-13b``): Llama names ``model.*`` / ``lm_head.*``,
  the projector as ``model.mm_projector.{0,2}.*``, the vision tower named by ``mm_vision_tower`` in its config. The
  original LLaVA (v1) has one linear projector, ``model.mm_projector.{weight,bias}``: internally ``linear_1``, with
  ``linear_2`` the identity.
* ``llama``: a Vicuna / Llama language model; ``clip``: a CLIP (vision) checkpoint.

Internally every tensor carries its transformers-5 module name: ``model.language_model.layers.0...``,
``model.vision_tower.encoder...``, ``model.multi_modal_projector.linear_1...``, ``lm_head.weight``.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["EXPORT_INFO_FILE", "FROM_PRETRAINED_KEY_MAPPING", "IMAGE_NEWLINE", "PROJECTOR_LAYERS", "checkpoint_layout",
           "original_text_fields", "projector_key", "to_hf", "to_internal", "to_original"]

EXPORT_INFO_FILE = "lora_llava.json"
"""Written by ``lora-llava merge`` next to an export: ``{"template", "format", "dtype", "run", "stage"}`` (a checkpoint
may carry one by hand: ``{"template": ..., "image_aspect_ratio": ...}``)."""
IMAGE_NEWLINE = "image_newline"
"""LLaVA-NeXT's learned embedding after every row of an image's grid features: ``model.image_newline`` internally and
in the original layout, ``image_newline`` in the llava-hf Hub layout."""
PROJECTOR_LAYERS = {"0": "linear_1", "2": "linear_2"}
"""The reference's ``nn.Sequential`` index of each projector Linear (GELU sits at 1) -> transformers' name."""
_PROJECTOR_INDEX = {v: k for k, v in PROJECTOR_LAYERS.items()}
_CLIP_TOP = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
# Fields of an original LLaVA config.json that are LLaVA's, not the Llama config's.
_ORIGINAL_ONLY = ("mm_", "image_", "tune_mm", "freeze_mm", "unfreeze_mm", "use_mm", "tokenizer_")

FROM_PRETRAINED_KEY_MAPPING: dict[str, dict[str, str]] = {
    # Renamings apply in order; the last one must not catch what the projector ones made.
    "llava-original": {
        **{rf"^model\.mm_projector\.{i}\.": f"model.multi_modal_projector.{name}."
           for i, name in PROJECTOR_LAYERS.items()},
        # A checkpoint that carries its tower (LLaVA-1.6 trained it): the reference's CLIPVisionTower wrapper names.
        r"^model\.vision_tower\.vision_tower\.vision_model\.": "model.vision_tower.",
        r"^model\.mm_projector\.(?=weight$|bias$)": "model.multi_modal_projector.linear_1.",  # v1: one Linear
        r"^model\.(?!mm_projector\.|multi_modal_projector\.|vision_tower\.|image_newline$)": "model.language_model.",
    },
    "llama": {r"^model\.": "model.language_model."},
}
"""``key_mapping`` for ``LlavaForConditionalGeneration.from_pretrained`` of a checkpoint in that layout."""


def checkpoint_layout(config: dict[str, Any]) -> str:
    """``llava-hf``, ``llava-original``, ``llama``, ``clip`` or the config's own model type."""
    model_type = config.get("model_type", "?")
    # Before model_type: the original releases (liuhaotian/llava-v1.5-7b) say "model_type": "llava" too.
    if "mm_vision_tower" in config or "mm_projector_type" in config or model_type in ("llava_llama", "llava_mistral"):
        return "llava-original"
    if model_type in ("llava", "llava_next"):  # LLaVA-1.5 or LLaVA-NeXT (AnyRes): the same tensor names
        return "llava-hf"
    if model_type in ("clip", "clip_vision_model"):
        return "clip"
    return model_type


def original_text_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The Llama fields of an original LLaVA ``config.json`` (its ``mm_*`` and other LLaVA fields dropped)."""
    return {k: v for k, v in config.items()
            if not k.startswith(_ORIGINAL_ONLY) and k not in ("architectures", "model_type", "_name_or_path")}


def projector_key(key: str) -> str | None:
    """``linear_1.weight`` ... for a projector tensor named in any layout (ours, llava-hf, the reference's
    ``mm_projector.bin``); None for any other tensor."""
    for index, name in PROJECTOR_LAYERS.items():
        for prefix in (f"multi_modal_projector.{name}.", f"mm_projector.{index}."):
            if prefix in key:
                return f"{name}.{key.split(prefix, 1)[1]}"
    if key.endswith(("mm_projector.weight", "mm_projector.bias")):  # LLaVA v1's single Linear
        return "linear_1." + key.rsplit(".", 1)[1]
    return None


def to_internal(key: str, source: str) -> str | None:
    """The internal name of a checkpoint key; None for tensors an export does not carry (CLIP's text half, ...).

    ``source``: ``llava-hf``, ``llava-original``, ``llama`` (a Vicuna / Llama checkpoint) or ``clip``.
    """
    if source == "clip":
        key = key.removeprefix("vision_model.")
        return f"model.vision_tower.{key}" if key.startswith(_CLIP_TOP) else None
    if source == "llama":
        return "lm_head.weight" if key == "lm_head.weight" else re.sub(r"^model\.", "model.language_model.", key)
    if key in (IMAGE_NEWLINE, "model." + IMAGE_NEWLINE):  # LLaVA-NeXT's row separator, in every layout
        return "model." + IMAGE_NEWLINE
    if source == "llava-original":
        if key.startswith("model.mm_projector."):
            return "model.multi_modal_projector." + projector_key(key) if projector_key(key) else None
        if key.startswith("model.vision_tower."):  # some releases carry the tower: model.vision_tower.vision_tower.*
            rest = key.removeprefix("model.vision_tower.").removeprefix("vision_tower.").removeprefix("vision_model.")
            return f"model.vision_tower.{rest}"
        return to_internal(key, "llama")
    # llava-hf: the Hub layout (language_model.model.*, vision_tower.vision_model.*) or transformers 5's own names.
    if key.startswith("language_model.lm_head."):
        return "lm_head." + key.removeprefix("language_model.lm_head.")
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    if key.startswith("language_model."):
        return "model." + key
    for prefix in ("vision_tower.", "model.vision_tower."):
        if key.startswith(prefix):
            return "model.vision_tower." + key.removeprefix(prefix).removeprefix("vision_model.")
    if key.startswith("multi_modal_projector."):
        return "model." + key
    return key


def to_hf(name: str) -> str:
    """Internal name -> the llava-hf Hub layout (what vLLM and transformers both load)."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith("model.language_model."):
        return "language_model.model." + name.removeprefix("model.language_model.")
    if name.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + name.removeprefix("model.vision_tower.")
    return name.removeprefix("model.")


def to_original(name: str, linear: bool = False) -> str | None:
    """Internal name -> the original LLaVA layout (no vision tower there: ``mm_vision_tower`` names it). ``linear``:
    v1's single-Linear projector, ``model.mm_projector.{weight,bias}`` from ``linear_1`` (``linear_2``, the
    identity, is not written)."""
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    key = projector_key(name)
    if key is not None:
        layer, param = key.split(".", 1)
        if linear:
            return f"model.mm_projector.{param}" if layer == "linear_1" else None
        return f"model.mm_projector.{_PROJECTOR_INDEX[layer]}.{param}"
    if name.startswith("model.vision_tower."):
        return None
    return name
