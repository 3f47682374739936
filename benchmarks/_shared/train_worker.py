"""One train-step configuration in a process of its own, so that its peak memory is its own:

    python -m benchmarks._shared.train_worker SPEC.json

:mod:`benchmarks.train_step` writes the spec (``config``, ``recipe`` as a dict, ``records``: a JSON file of
LLaVA-format records, ``out``) and starts this module; it writes the result JSON to ``out``: the step records of
:func:`~benchmarks._shared.timing.step_recorder`, the peak memory, the device and notes.

``ours`` is what ``lora_llava.train.sft.train`` sets up (its ``build_trainer``), without the run folder it writes
after training (not part of the measurement). ``trl`` is ``trl.SFTTrainer`` + its VLM collator on the same model
(lora-llava's ``build_model``: the same NF4 model, LoRA and trainable projector).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .llava_inputs import CHAT_TEMPLATE, PLAIN_TEMPLATE, trl_dataset
from .timing import step_recorder


def set_language_model_attention(model, attention: str) -> None:
    """Switch the language model's attention kernel (e.g. ``flex_attention``, which a recipe cannot name) on a loaded
    (PEFT-wrapped) LLaVA; the vision tower keeps its own. transformers reads the kernel from the config at every
    forward, so this takes effect from the next step."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation({"text_config": attention})
    got = base.config.text_config._attn_implementation
    if got != attention:
        raise RuntimeError(f"the language model's attention is {got!r} after asking for {attention!r}")


def lora_llava_trainer(recipe, records: list[dict], callbacks: list, attention: str | None = None):
    """lora-llava's trainer for ``recipe`` on ``records``, set up as ``train()`` sets it up (seed, arguments, model on
    this process's device, tokenized data), ``callbacks`` added; ``attention``: another kernel for the language model
    (:func:`set_language_model_attention`)."""
    from transformers import set_seed

    from lora_llava.model.runtime import resolve_dtype
    from lora_llava.model.stage import build_model
    from lora_llava.train.launch import detect_launch, device_map
    from lora_llava.train.sft import build_datasets, sft_config
    from lora_llava.train.trainer import build_trainer

    set_seed(recipe.train.seed)
    args = sft_config(recipe, resolve_dtype(recipe.model.dtype))
    model, processor = build_model(recipe, device_map(detect_launch(recipe)))
    if attention:
        set_language_model_attention(model, attention)
    train_ds, _ = build_datasets(recipe, processor, model.config, train_records=records)
    return build_trainer(recipe, model, processor, train_ds.to_hf(), args=args, callbacks=callbacks)


def trl_trainer(recipe, records: list[dict], callbacks: list, notes: list[str]):
    """TRL's ``SFTTrainer`` (padding, its default labels: every non-pad token) on lora-llava's model for ``recipe``,
    the vicuna_v1 (stage 2) / plain (stage 1) prompt as a chat template."""
    import dataclasses

    import torch
    from trl import SFTTrainer

    from lora_llava.model.stage import build_model
    from lora_llava.train.sft import sft_config

    model, processor = build_model(recipe)  # the same NF4 model, LoRA and trainable projector as ours
    processor.chat_template = PLAIN_TEMPLATE if recipe.train.stage == 1 else CHAT_TEMPLATE
    dtype = model.get_input_embeddings().weight.dtype
    args = dataclasses.replace(sft_config(recipe, dtype), remove_unused_columns=True, dataset_kwargs=None,
                               max_length=recipe.data.max_length)
    trainer = SFTTrainer(model=model, args=args, processing_class=processor, callbacks=callbacks,
                         train_dataset=trl_dataset(records, Path(recipe.data.image_folder)))
    cast = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    if dtype == torch.float32 and cast != ["torch.float32"]:
        # TRL casts the trainable weights of a quantized model to bf16, which an fp32 (CPU) model cannot run (the
        # projector's matmul gets fp32 inputs): put them back in fp32 here only.
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        notes.append("TRL's bf16 cast of the trainables undone (fp32 CPU model)")
    return trainer


def run(spec: dict) -> dict:
    """Train the spec's configuration; the result (see the module docstring)."""
    import logging

    import datasets
    import torch
    import transformers

    from lora_llava.config.recipe import recipe_from_dict

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    recipe = recipe_from_dict(spec["recipe"])
    records = json.loads(Path(spec["records"]).read_text())
    notes: list[str] = []
    recorder = step_recorder()
    t = time.perf_counter()
    if spec["config"] == "trl":
        trainer = trl_trainer(recipe, records, [recorder], notes)
    else:
        trainer = lora_llava_trainer(recipe, records, [recorder], spec.get("attention"))
    trainer.train()
    if "paged" in str(recipe.train.optim) and not torch.cuda.is_available():
        notes.append("bitsandbytes: paged optimizers fall back to non-paged on the CPU")
    cuda = torch.cuda.is_available()
    return {"status": "ok", "steps": recorder.steps, **recorder.info,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "gpu_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None, "notes": notes,
            "seconds": time.perf_counter() - t}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {__spec__.name} SPEC.json (started by benchmarks.train_step)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["out"]).write_text(json.dumps(run(spec)))


if __name__ == "__main__":
    main()
