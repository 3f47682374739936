"""The offline demo: a tiny random LLaVA and a generated "coloured shapes" dataset, through the real code path.

The model is a real ``LlavaForConditionalGeneration`` (Llama text model, CLIP vision model, GELU projector) with the
real Vicuna tokenizer, only small and randomly initialised; it is saved in the llava-hf layout and loaded back by
the same code as a real checkpoint, 4-bit quantization included. The data are PNG files and a LLaVA-format JSON.

``demo.anyres`` (``recipes/demo_hd.yaml``) makes the high-resolution variant instead: a real
``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.5-HD: 1x2, 2x1 and 2x2 grids of tower-sized tiles plus a
downscaled view, a newline embedding per grid row) in the llava-next-hf layout, and images of 1 to 2 tiles a side in
both directions, so each sample's image-token count differs.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from PIL import Image, ImageDraw

from .files import atomic_dir, write_text_atomic
from .llava.tokenizer import add_llava_tokens, image_token_id, vicuna_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["COLOURS", "SHAPES", "make_demo_model", "make_shapes_data", "prepare_demo"]

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = (
    "What is in the image?",
    "What shape is shown, and what colour is it?",
    "Describe the object in the picture.",
    "What do you see?",
)


def make_demo_model(out_dir: str | Path, image_size: int = 48, seed: int = 0, hidden_size: int = 128,
                    anyres: bool = False, projector_type: str = "mlp2x_gelu", start_end: bool = False) -> Path:
    """Write a tiny random LLaVA-1.5-shaped model + processor in the llava-hf layout to ``out_dir``; with ``anyres``
    a tiny LLaVA-NeXT (the default 1x2 / 2x1 / 2x2 grid of ``image_size`` tiles) in the llava-next-hf layout.

    ``projector_type: linear`` and ``start_end`` give the original LLaVA's (v1) shape: one linear projector (identity
    activation, ``linear_2`` the identity) and ``<im_start>`` / ``<im_end>`` in the tokenizer."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    from .llava.anyres import grid_pinpoints

    out_dir = Path(out_dir)
    tok = vicuna_tokenizer()
    add_llava_tokens(tok, start_end=start_end)  # <image> 32000, <pad> 32001 (v1: <im_start> 32001, <im_end> 32002,
    # <pad> 32003), as the llava-hf checkpoints and the original v1 have them
    patch = 8
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch, projection_dim=64)
    text = LlamaConfig(vocab_size=32064, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=tok.pad_token_id,
                       # A trained LLM's head gives confident logits; a random one at the usual 0.02 scale cannot
                       # (its largest logit margin stays near 1 with a frozen head), so the loss would barely move.
                       initializer_range=0.1)
    common = dict(vision_config=vision, text_config=text, image_token_index=image_token_id(tok),
                  projector_hidden_act="linear" if projector_type == "linear" else "gelu", vision_feature_layer=-2,
                  vision_feature_select_strategy="default",
                  image_seq_length=(image_size // patch) ** 2, pad_token_id=tok.pad_token_id)
    size = dict(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    torch.manual_seed(seed)
    if anyres:
        pins = grid_pinpoints(image_size)
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=pins))
        image_processor = LlavaNextImageProcessor(**size, image_grid_pinpoints=pins)
        processor_cls = LlavaNextProcessor
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
        image_processor = CLIPImageProcessor(**size)
        processor_cls = LlavaProcessor
    if projector_type == "linear":
        with torch.no_grad():
            linear_2 = model.model.multi_modal_projector.linear_2
            linear_2.weight.copy_(torch.eye(linear_2.weight.shape[0]))
            linear_2.bias.zero_()
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>")  # noqa: S106 - a token, not a password
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir


def _draw(colour: str, shape: str, width: int, height: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    im = Image.new("RGB", (width, height), bg)
    d = ImageDraw.Draw(im)
    size = rng.randint(int(0.55 * min(width, height)), int(0.9 * min(width, height)))
    x = rng.randint(0, width - size)
    y = rng.randint(0, height - size)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    box = (x, y, x + size, y + size)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=fill)
    return im


def make_shapes_data(out_dir: str | Path, train_samples: int, eval_samples: int, image_size: int = 48,
                     seed: int = 0, anyres: bool = False) -> tuple[Path, Path]:
    """Write PNG images of one coloured shape each and LLaVA-format ``train.json`` / ``eval.json``; with ``anyres``
    each image is 1 to 2 ``image_size`` a side, in both directions (tall, wide, large), for a grid model."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {}
    for split, n in (("train", train_samples), ("eval", eval_samples)):
        records = []
        for i in range(n):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if anyres:
                w, h = rng.randint(image_size, 2 * image_size), rng.randint(image_size, 2 * image_size)
            else:
                # Not square, so LLaVA-1.5's pad-to-square runs as it does on real photos.
                w, h = image_size + rng.randint(0, image_size // 2), image_size
            name = f"images/{split}_{i:05d}.png"
            _draw(colour, shape, w, h, rng).save(out_dir / name)
            question = rng.choice(QUESTIONS)
            records.append({
                "id": f"{split}-{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": f"A {colour} {shape}."},
                ],
            })
        splits[split] = write_text_atomic(out_dir / f"{split}.json", json.dumps(records, indent=1))
    return splits["train"], splits["eval"]


def prepare_demo(recipe) -> None:
    """Generate the demo model and data the recipe points at, where they are missing."""
    demo = recipe.demo
    model_dir = Path(recipe.model.llava)
    if not (model_dir / "config.json").is_file():
        logger.info("demo: writing a tiny random LLaVA to %s", model_dir)
        make_demo_model(model_dir, image_size=demo.image_size, seed=demo.seed, anyres=demo.anyres,
                        projector_type=recipe.model.projector_type,
                        start_end=recipe.model.image_tokens == "start_end")
    train_file = Path(recipe.data.train[0])
    if not train_file.is_file():
        logger.info("demo: writing %d + %d coloured-shape samples to %s", demo.train_samples, demo.eval_samples,
                    train_file.parent)
        make_shapes_data(train_file.parent, demo.train_samples, demo.eval_samples, demo.image_size, demo.seed,
                         anyres=demo.anyres)
