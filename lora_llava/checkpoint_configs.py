"""What a checkpoint is, read from its config files alone (no weights): its layout, LLaVA-1.5's ``LlavaConfig`` built
from a text and a vision config, the image-token facts of a config, and the projector shapes a recipe's model will
have. :mod:`lora_llava.loading` builds models on these; :mod:`lora_llava.export` and the stage-chaining check use
them without loading anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .recipe import Recipe

__all__ = ["DEFAULT_VISION_TOWER", "ModelError", "checkpoint_layout", "image_token_id", "llava_config",
           "num_image_tokens", "original_text_fields", "projector_shapes", "read_config_dict"]

DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
# Fields of an original LLaVA config.json that are LLaVA's, not the Llama config's.
_ORIGINAL_ONLY = ("mm_", "image_", "tune_mm", "freeze_mm", "unfreeze_mm", "use_mm", "tokenizer_")


class ModelError(ValueError):
    """A model that cannot be built as asked; the message names the path or key to change."""


def num_image_tokens(config) -> int:
    """Image tokens per image: (image size / patch size)^2, plus the CLS token with the ``full`` strategy."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def image_token_id(config) -> int:
    value = getattr(config, "image_token_id", None)
    return value if value is not None else config.image_token_index


# --------------------------------------------------------------------------------------------------------------------
# Reading configs without loading weights.


def _check_checkpoint(path: str, key: str) -> None:
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith((".", "~")) or p.exists() or path.count("/") != 1
    if looks_local and not p.exists():
        raise ModelError(f"{key}: '{path}' does not exist")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelError(f"{key}: '{path}' has no config.json; is it a model checkpoint folder?")
    if p.exists() and not p.is_dir():
        raise ModelError(f"{key}: '{path}' is a file; give the checkpoint's folder")


def read_config_dict(path: str, key: str) -> dict[str, Any]:
    """The raw ``config.json`` of a local folder or Hub id (no model class needed, so original LLaVA reads too)."""
    from transformers import PretrainedConfig

    _check_checkpoint(path, key)
    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{key}: '{path}' is not a local folder and could not be loaded from the Hub ({e})") from None
    return config


def checkpoint_layout(config: dict[str, Any]) -> str:
    """``llava-hf``, ``llava-original``, ``llama``, ``clip`` or the config's own model type."""
    model_type = config.get("model_type", "?")
    if model_type == "llava":
        return "llava-hf"
    if "mm_vision_tower" in config or "mm_projector_type" in config or model_type in ("llava_llama", "llava_mistral"):
        return "llava-original"
    if model_type in ("clip", "clip_vision_model"):
        return "clip"
    return model_type


def original_text_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The Llama fields of an original LLaVA ``config.json`` (its ``mm_*`` and other LLaVA fields dropped)."""
    return {k: v for k, v in config.items()
            if not k.startswith(_ORIGINAL_ONLY) and k not in ("architectures", "model_type", "_name_or_path")}


def _text_config_from_original(config: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(**original_text_fields(config))


def llava_config(text_config, vision_config, image_token_id: int, feature_layer: int = -2, strategy: str = "default",
                 **extra: Any):
    """LLaVA-1.5's ``LlavaConfig``: GELU projector with biases, features of ``feature_layer``, image tokens from the
    tower's patch grid (plus CLS with the ``full`` strategy)."""
    from transformers import LlavaConfig

    vc = vision_config if isinstance(vision_config, dict) else vision_config.to_dict()
    patches = (vc["image_size"] // vc["patch_size"]) ** 2
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
        image_seq_length=patches + (1 if strategy == "full" else 0), multimodal_projector_bias=True, **extra,
    )


def projector_shapes(recipe: Recipe) -> dict[str, tuple[int, ...]] | None:
    """The shapes of the projector the recipe's model will have, read from config files alone (no weights).

    None when the checkpoint is of a kind :func:`load_model` refuses anyway (it names the problem then).
    """
    from transformers import CLIPVisionConfig, LlavaConfig

    m = recipe.model
    layers = 1
    if m.llava is not None:
        config = read_config_dict(m.llava, "model.llava")
        layout = checkpoint_layout(config)
        if layout == "llava-hf":
            c = LlavaConfig.from_dict(config)
            text, vision = c.text_config.hidden_size, c.vision_config.hidden_size
            layers = len(_as_list(c.vision_feature_layer))
        elif layout == "llava-original":
            text = _text_config_from_original(config).hidden_size
            vision = config.get("mm_hidden_size")
            if vision is None:
                tower = m.vision_tower or config.get("mm_vision_tower") or DEFAULT_VISION_TOWER
                vision = CLIPVisionConfig.from_pretrained(tower).hidden_size
        else:
            return None
    else:
        config = read_config_dict(m.llm, "model.llm")
        if "hidden_size" not in config:
            return None
        text = config["hidden_size"]
        tower = m.vision_tower or DEFAULT_VISION_TOWER
        read_config_dict(tower, "model.vision_tower")
        vision = CLIPVisionConfig.from_pretrained(tower).hidden_size
    return {"linear_1.weight": (text, vision * layers), "linear_1.bias": (text,),
            "linear_2.weight": (text, text), "linear_2.bias": (text,)}


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
