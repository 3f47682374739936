"""LLaVA-1.5 facts (from its reference implementation) that several parts of lora-llava need, each stated once."""

from __future__ import annotations

__all__ = ["CLIP_MEAN", "DEFAULT_VISION_TOWER", "IGNORE_INDEX", "IMAGE_END_TOKEN", "IMAGE_START_TOKEN", "IMAGE_TOKEN",
           "LLAVA15_IMAGE_TOKENS", "LORA_TARGETS", "PAD_TOKEN", "SPECIAL_TEXTS", "UNQUANTIZED_MODULES",
           "V1_VISION_TOWER", "VOCAB_MULTIPLE", "image_tokens", "padded_vocab"]

IMAGE_TOKEN = "<image>"  # noqa: S105 - a token, not a password
"""The image placeholder, in the data's text and in the tokenizer (id 32000 on Vicuna's vocabulary)."""
PAD_TOKEN = "<pad>"  # noqa: S105 - a token, not a password
"""The padding token the llava-hf checkpoints add (id 32001 on Vicuna's vocabulary)."""
IMAGE_START_TOKEN = "<im_start>"  # noqa: S105 - a token, not a password
"""LLaVA v1 (``mm_use_im_start_end``) wraps each image's tokens in this token and :data:`IMAGE_END_TOKEN`."""
IMAGE_END_TOKEN = "<im_end>"  # noqa: S105 - a token, not a password
"""Closes an image's tokens in LLaVA v1."""
VOCAB_MULTIPLE = 64
"""The llava-hf checkpoints pad the vocabulary (32002 tokens) to a multiple of 64 (32064 rows)."""
SPECIAL_TEXTS = {"<s>": "the beginning-of-sequence token (1)", "</s>": "the end-of-sequence token (2)",
                 "<unk>": "the unknown token (0)"}
"""Strings in a text that the Llama tokenizer reads as one special token, here and in the LLaVA reference alike."""
IGNORE_INDEX = -100
"""Label of a position that is not trained on."""

DEFAULT_VISION_TOWER = "openai/clip-vit-large-patch14-336"
"""LLaVA-1.5's frozen vision tower: CLIP ViT-L/14 at 336 px."""
V1_VISION_TOWER = "openai/clip-vit-large-patch14"
"""The original LLaVA's (v1) frozen vision tower: CLIP ViT-L/14 at 224 px (16 x 16 = 256 image tokens)."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""The CLIP processor's mean colour: LLaVA-1.5 pads images to a square with it (``image_aspect_ratio: pad``)."""

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""The language model's linear layers LLaVA-1.5's LoRA adapts (all of them)."""
UNQUANTIZED_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
"""Full module paths (transformers 5 names) that stay unquantized: a bare "multi_modal_projector" no longer matches."""


def image_tokens(image_size: int, patch_size: int, strategy: str = "default") -> int:
    """Image tokens per image: the tower's patch grid, plus the CLS token with the ``full`` feature strategy."""
    return (image_size // patch_size) ** 2 + (1 if strategy == "full" else 0)


LLAVA15_IMAGE_TOKENS = image_tokens(336, 14)
"""576: CLIP ViT-L/14 at 336 px gives 24 x 24 patches (CLS dropped)."""


def padded_vocab(size: int) -> int:
    """The vocabulary padded to a multiple of 64, as the llava-hf checkpoints have it (32002 -> 32064)."""
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
