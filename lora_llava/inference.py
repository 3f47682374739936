"""Greedy generation with the tokenization used in training (same template, same image tokens)."""

from __future__ import annotations

import torch

from .data import encode_prompt, get_template, load_image
from .data.images import CLIP_MEAN
from .modeling import image_token_id, num_image_tokens

__all__ = ["generate_answers"]


@torch.no_grad()
def generate_answers(model, processor, prompts: list[list[tuple[str, str]]], images: list[list[str]],
                     image_folder: str | None, template: str = "vicuna_v1", image_aspect_ratio: str = "pad",
                     max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Answer each conversation (ending on a human turn) greedily; returns the decoded answers.

    ``images[i]`` are the image paths (relative to ``image_folder``) of conversation ``i``.
    """
    tmpl = get_template(template)
    tok = processor.tokenizer
    config = model.config
    img_id, n_img = image_token_id(config), num_image_tokens(config)
    pad_id = tok.pad_token_id
    mean = tuple(getattr(processor.image_processor, "image_mean", None) or CLIP_MEAN)
    device = next(p.device for p in model.parameters())
    pixel_dtype = next(p.dtype for n, p in model.named_parameters() if "vision_tower" in n)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            ids = [encode_prompt(prompts[i], tok, tmpl, img_id, n_img) for i in chunk]
            longest = max(map(len, ids))
            # Left padding, so every prompt ends where generation starts.
            input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, seq in enumerate(ids):
                input_ids[row, longest - len(seq):] = torch.tensor(seq)
                mask[row, longest - len(seq):] = 1
            kwargs = {}
            files = [f for i in chunk for f in images[i]]
            if files:
                pics = [load_image(image_folder, f, image_aspect_ratio, mean) for f in files]
                pixel_values = processor.image_processor(images=pics, return_tensors="pt")["pixel_values"]
                kwargs["pixel_values"] = pixel_values.to(device, pixel_dtype)
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, use_cache=True, pad_token_id=pad_id, eos_token_id=tok.eos_token_id, **kwargs,
            )
            for row in out[:, longest:]:
                text = tok.decode(row, skip_special_tokens=True)
                if tmpl.stop and tmpl.stop != tok.eos_token:
                    text = text.split(tmpl.stop)[0]
                answers.append(text.strip())
    finally:
        model.train(was_training)
    return answers
