"""Run by the LLaVA reference environment (tests/reference_env.py), not by pytest: load an export in the original
layout with the reference's ``load_pretrained_model`` and write the logits of given token ids, the image spliced in
where an id is -200 (the reference's image index) by the reference's own code. For LLaVA v1 exports (linear
projector, ``mm_use_im_start_end``), whose "###" prompt the reference's current templates no longer render as v1
trained, the ids come from lora-llava's training tokenization.

    python reference_llava_ids.py EXPORT CASES.json OUT_DIR

CASES.json: ``[{"input_ids": [int, ...], "image": path or null}]``. Writes ``OUT_DIR/logits{k}.npy`` and
``OUT_DIR/info.json`` (tokenizer size, the ids of <im_start>/<im_end>, the projector's class, the config's flags).
The current directory must be EXPORT (``mm_vision_tower`` is relative to it); float16 is made float32 as in
reference_llava.py.
"""

import json
import sys
from pathlib import Path

import llava.model.builder as builder
import numpy as np
import torch
from llava.mm_utils import get_model_name_from_path
from reference_llava import _Float32Torch, image_kwargs


def main(export: str, cases_file: str, out_dir: str) -> None:
    builder.torch = _Float32Torch("torch")
    tokenizer, model, image_processor, _ = builder.load_pretrained_model(
        export, None, get_model_name_from_path(export), device="cpu")
    model.eval()
    out = Path(out_dir)
    for k, case in enumerate(json.loads(Path(cases_file).read_text())):
        kwargs = image_kwargs(case, image_processor, model)
        with torch.inference_mode():
            logits = model(torch.tensor([case["input_ids"]]), **kwargs).logits[0].float().numpy()
        np.save(out / f"logits{k}.npy", logits)
    info = {"vocab": len(tokenizer), "im_start": tokenizer.convert_tokens_to_ids("<im_start>"),
            "im_end": tokenizer.convert_tokens_to_ids("<im_end>"),
            "projector": type(model.get_model().mm_projector).__name__,
            "mm_use_im_start_end": model.config.mm_use_im_start_end, "dtype": str(model.dtype)}
    (out / "info.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(*sys.argv[1:])
