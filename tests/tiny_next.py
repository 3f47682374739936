"""A tiny random LLaVA-NeXT built in memory (no files), for the AnyRes data and training tests."""

from __future__ import annotations

import torch

from lora_llava.llava.anyres import grid_pinpoints
from lora_llava.llava.constants import IMAGE_TOKEN
from lora_llava.llava.tokenizer import image_token_id

TILE, PATCH = 32, 8
"""The tiny tower: 32 px tiles of 8 px patches, 16 tokens per view."""


def tiny_next(tokenizer):
    """(model, processor) of a tiny random LLaVA-NeXT: CLIP 32 px / 8 px patches, grid 1x2, 2x1, 2x2 of 32 px tiles,
    a 2-layer Llama over ``tokenizer``'s vocabulary (Vicuna's + <image> + <pad>), sdpa attention, seed 0."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TILE, patch_size=PATCH, projection_dim=32)
    text = LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id(tokenizer),
                             image_grid_pinpoints=grid_pinpoints(TILE), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config)
    model.config._attn_implementation = "sdpa"
    ip = LlavaNextImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                 image_grid_pinpoints=grid_pinpoints(TILE))
    processor = LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   image_token=IMAGE_TOKEN)
    return model, processor
