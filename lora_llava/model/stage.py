"""The stage policy: what trains in stage 1 and stage 2, LoRA's config, and the model that training starts from.

Everything ends in a transformers ``LlavaForConditionalGeneration`` (wrapped in a ``PeftModel`` in stage 2).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch

from ..errors import ModelError
from ..llava.constants import LORA_TARGETS
from ..llava.spec import ModelSpec
from ..llava.tokenizer import image_wrap_ids
from ..run.folder import projector_file
from .loading import load_model
from .projector import (
    ROWS,
    check_projector_shapes,
    load_projector,
    projector_parameters,
    read_projector,
    trained_projector_parameters,
)

logger = logging.getLogger(__name__)

__all__ = ["apply_stage", "build_model", "lora_config", "model_summary", "set_trainable_dtype"]


def lora_config(recipe):
    """A ``peft.LoraConfig`` from the ``lora`` section, restricted to the language model's layers."""
    from peft import LoraConfig

    sec = recipe.lora
    kwargs = {f.name: getattr(sec, f.name) for f in dataclasses.fields(sec)}
    targets = kwargs.pop("target_modules")
    if isinstance(targets, list):
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad:
            raise ModelError(
                f"lora.target_modules: {bad} are not language-model projections; choose from {LORA_TARGETS}"
            )
        # A regex over full names keeps LoRA off the vision tower (which also has q_proj/k_proj/v_proj).
        targets = rf"^model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(map(re.escape, targets))})$"
    return LoraConfig(target_modules=targets, **kwargs)


def apply_stage(model, recipe, token_rows: list[int] | None = None):
    """Freeze / unfreeze per ``train.stage`` and attach LoRA in stage 2. Returns the model to train.

    Stage 1: only the projector (with a NeXT model's ``image_newline``) trains. Stage 2: LoRA on the language model's
    q/k/v/o/gate/up/down, projector (and ``image_newline``) fully trained, vision tower and everything else frozen.
    ``token_rows`` (LLaVA v1's ``<im_start>``/``<im_end>`` ids): those input embedding rows train too, in both stages,
    through peft's trainable tokens (every other row, and the output embeddings, stay frozen). A linear (v1)
    projector trains ``linear_1`` only; ``linear_2`` stays the identity. Trainable parameters are kept in
    ``train.trainable_dtype`` (fp32 by default: mixed precision's master weights); the frozen model is not upcast.
    """
    from peft import get_peft_model

    model.requires_grad_(False)
    if recipe.train.stage == 2:
        config = lora_config(recipe)
        if token_rows:
            config.trainable_token_indices = list(token_rows)
        model = get_peft_model(model, config)
    elif getattr(model, "is_quantized", False) or token_rows:
        # transformers' Trainer refuses a quantized model that is not a PeftModel. A PeftModel with no LoRA layers at
        # all (peft's "dummy" targets) passes that check and changes nothing; the projector trains as a plain module.
        from peft import LoraConfig
        from peft.utils.constants import DUMMY_TARGET_MODULES

        model = get_peft_model(model, LoraConfig(target_modules=DUMMY_TARGET_MODULES,
                                                 trainable_token_indices=list(token_rows) if token_rows else None))
    for _, p in trained_projector_parameters(model):
        p.requires_grad_(True)
    dtype = getattr(torch, recipe.train.trainable_dtype)
    computes = model.get_input_embeddings().weight.dtype
    if dtype == torch.bfloat16 and computes != torch.bfloat16:
        raise ModelError(f"train.trainable_dtype: bfloat16 needs a bf16 model, but model.dtype '{recipe.model.dtype}' "
                         f"gave {str(computes).removeprefix('torch.')} here (no bf16 GPU?); use float32")
    set_trainable_dtype(model, dtype)
    model.config.use_cache = False
    return model


def set_trainable_dtype(model, dtype: torch.dtype = torch.float32) -> None:
    """Cast trainable weights to ``dtype`` (fp32: mixed precision's master weights); frozen weights keep theirs."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def build_model(recipe, device_map: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The model to train (stage policy applied) and its processor, as the recipe says.

    The model comes from a llava-hf checkpoint, an original LLaVA checkpoint (converted on load) or is assembled from
    ``model.llm`` + ``model.vision_tower``; ``model.projector`` then replaces the projector. ``device_map``: where the
    weights go (training passes the GPU of its local rank).
    """
    spec = ModelSpec.from_recipe(recipe)
    # Read and checked first: a missing, malformed or mismatched projector fails before any weights load.
    projector = None
    if recipe.model.projector is not None:
        source = projector_file(recipe.model.projector)
        projector = read_projector(source)
        m = recipe.model
        model_name = f"model.llava '{m.llava}'" if m.llava is not None else f"model.llm '{m.llm}'"
        check_projector_shapes(recipe.model.projector, projector, spec.projector_shapes(), model_name)
    model, processor = load_model(recipe, spec, device_map)
    rows = image_wrap_ids(processor.tokenizer)
    if projector is not None:
        if ROWS in projector and rows is None:
            raise ModelError(f"model.projector: '{recipe.model.projector}' holds trained <im_start>/<im_end> rows (a "
                             "LLaVA v1 projector), but this model has no such tokens; set model.image_tokens: "
                             "start_end")
        load_projector(model, projector, recipe.model.projector)
        logger.info("projector loaded from %s", recipe.model.projector)
    return apply_stage(model, recipe, list(rows) if rows else None), processor


def model_summary(model) -> dict[str, Any]:
    """Parameter counts (total / trainable: LoRA, projector, other), quantized module count, dtype."""
    import bitsandbytes as bnb

    total = trainable = lora = projector = 0
    projector_names = {n for n, _ in projector_parameters(model)}  # image_newline of a NeXT model included
    for name, p in model.named_parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # packed 4-bit: two weights per byte
        total += n
        if p.requires_grad:
            trainable += n
            if "lora_" in name:
                lora += n
            elif name in projector_names:
                projector += n
    quantized = sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    dtype = next((p.dtype for n, p in model.named_parameters() if "vision_tower" in n), None)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return {"attention": getattr(config, "_attn_implementation", None) or "?", "total": total, "trainable": trainable,
            "lora": lora, "projector": projector,
            "other_trainable": trainable - lora - projector, "quantized_modules": quantized, "dtype": str(dtype)}
