"""Run by the LLaVA reference environment (tests/reference_env.py), not by pytest: load an export in the original
layout with the reference's ``load_pretrained_model``, prepare each case with the reference's own preprocessing
(``conv_templates['vicuna_v1']``, ``tokenizer_image_token``, ``process_images``) and write, per case, the input ids,
the logits of the prompt and the greedy answer.

    python reference_llava.py EXPORT CASES.json OUT_DIR [CONVERSATIONS.json]

CASES.json: ``[{"question": str, "image": path or null}]``. CONVERSATIONS.json (optional): ``[[[role, text], ...]]``
(role ``human`` or ``gpt``, ending on ``human``), whose vicuna_v1 prompts ``tokenizer_image_token`` tokenizes into
``OUT_DIR/prompt_ids.json``. The current directory must be EXPORT: the reference opens
``mm_vision_tower`` relative to it. The reference loads weights in float16 on every device; to compare logits at 1e-4
this script makes the builder's ``torch.float16`` mean float32 (nothing else in the reference is changed).
"""

import json
import sys
import types
from pathlib import Path

import llava.model.builder as builder
import numpy as np
import torch
from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
from PIL import Image


class _Float32Torch(types.ModuleType):
    def __getattr__(self, name):
        return torch.float32 if name == "float16" else getattr(torch, name)


def image_kwargs(case: dict, image_processor, model) -> dict:
    """The reference's image inputs for a case (``images``, ``image_sizes``), none for a text-only case."""
    if not case["image"]:
        return {}
    image = Image.open(case["image"]).convert("RGB")
    return {"images": process_images([image], image_processor, model.config).to(model.dtype),
            "image_sizes": [image.size]}


def main(export: str, cases_file: str, out_dir: str, conversations_file: str = "") -> None:
    builder.torch = _Float32Torch("torch")
    tokenizer, model, image_processor, _ = builder.load_pretrained_model(
        export, None, get_model_name_from_path(export), device="cpu")
    model.eval()
    out = Path(out_dir)
    results = []
    for k, case in enumerate(json.loads(Path(cases_file).read_text())):
        conv = conv_templates["vicuna_v1"].copy()
        question = case["question"]
        if case["image"]:
            question = DEFAULT_IMAGE_TOKEN + "\n" + question
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
        kwargs = image_kwargs(case, image_processor, model)
        with torch.inference_mode():
            logits = model(input_ids, **kwargs).logits[0].float().numpy()
            generated = model.generate(input_ids, do_sample=False, max_new_tokens=8, use_cache=True, **kwargs)
        np.save(out / f"logits{k}.npy", logits)
        results.append({"prompt": prompt, "input_ids": input_ids[0].tolist(),
                        "answer": tokenizer.batch_decode(generated, skip_special_tokens=True)[0].strip(),
                        "dtype": str(model.dtype), "vocab": len(tokenizer)})
    (out / "results.json").write_text(json.dumps(results))
    if conversations_file:
        prompts = []
        for turns in json.loads(Path(conversations_file).read_text()):
            conv = conv_templates["vicuna_v1"].copy()
            for role, text in turns:
                conv.append_message(conv.roles[0 if role == "human" else 1], text)
            conv.append_message(conv.roles[1], None)
            prompts.append(tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX))
        (out / "prompt_ids.json").write_text(json.dumps(prompts))


if __name__ == "__main__":
    main(*sys.argv[1:])
