"""Assemble LLaVA-1.5 for training: load, quantize the language model, freeze per stage, attach LoRA.

Everything ends in a transformers ``LlavaForConditionalGeneration`` (wrapped in a ``PeftModel`` in stage 2).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import torch

from .loading import (
    UNQUANTIZED_MODULES,
    ModelError,
    choose_attention,
    image_token_id,
    load_model,
    num_image_tokens,
    projector_shapes,
    quantization_config,
    resolve_dtype,
)
from .recipe import Recipe

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_TARGETS",
    "ModelError",
    "UNQUANTIZED_MODULES",
    "build_model",
    "choose_attention",
    "image_token_id",
    "load_model",
    "load_projector",
    "lora_config",
    "model_summary",
    "num_image_tokens",
    "projector_parameters",
    "quantization_config",
    "resolve_dtype",
    "set_trainable_dtype",
]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_PROJECTOR = "multi_modal_projector"


def lora_config(recipe: Recipe):
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


def projector_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the multimodal projector."""
    return [(n, p) for n, p in model.named_parameters() if f".{_PROJECTOR}." in f".{n}"]


def apply_stage(model, recipe: Recipe):
    """Freeze / unfreeze per ``train.stage`` and attach LoRA in stage 2. Returns the model to train.

    Stage 1: only the projector trains. Stage 2: LoRA on the language model's q/k/v/o/gate/up/down, projector fully
    trained, vision tower and everything else frozen. Trainable parameters are kept in ``train.trainable_dtype``
    (fp32 by default: mixed precision's master weights); the frozen model is not upcast.
    """
    from peft import get_peft_model

    model.requires_grad_(False)
    if recipe.train.stage == 2:
        model = get_peft_model(model, lora_config(recipe))
    elif getattr(model, "is_quantized", False):
        # transformers' Trainer refuses a quantized model that is not a PeftModel. A PeftModel with no LoRA layers at
        # all (peft's "dummy" targets) passes that check and changes nothing; the projector trains as a plain module.
        from peft import LoraConfig
        from peft.utils.constants import DUMMY_TARGET_MODULES

        model = get_peft_model(model, LoraConfig(target_modules=DUMMY_TARGET_MODULES))
    for _, p in projector_parameters(model):
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


def build_model(recipe: Recipe) -> tuple[Any, Any]:
    """The model to train (stage policy applied) and its processor, as the recipe says.

    The model comes from a llava-hf checkpoint, an original LLaVA checkpoint (converted on load) or is assembled from
    ``model.llm`` + ``model.vision_tower``; ``model.projector`` then replaces the projector.
    """
    # Read and checked first: a missing, malformed or mismatched projector fails before any weights load.
    projector = None
    if recipe.model.projector is not None:
        projector = _read_projector(recipe.model.projector)
        _check_projector_shapes(recipe.model.projector, projector, projector_shapes(recipe), _model_key(recipe))
    model, processor = load_model(recipe)
    if projector is not None:
        load_projector(model, recipe.model.projector, projector)
        logger.info("projector loaded from %s", recipe.model.projector)
    return apply_stage(model, recipe), processor


def model_summary(model) -> dict[str, Any]:
    """Parameter counts (total / trainable: LoRA, projector, other), quantized module count, dtype."""
    import bitsandbytes as bnb

    total = trainable = lora = projector = 0
    for name, p in model.named_parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # packed 4-bit: two weights per byte
        total += n
        if p.requires_grad:
            trainable += n
            if "lora_" in name:
                lora += n
            elif _PROJECTOR in name:
                projector += n
    quantized = sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    dtype = next((p.dtype for n, p in model.named_parameters() if "vision_tower" in n), None)
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    return {"attention": getattr(config, "_attn_implementation", None) or "?", "total": total, "trainable": trainable,
            "lora": lora, "projector": projector,
            "other_trainable": trainable - lora - projector, "quantized_modules": quantized, "dtype": str(dtype)}


def _read_projector(path: str) -> dict[str, torch.Tensor]:
    """Projector weights as ``linear_1/linear_2`` tensors from a run folder, a safetensors file or mm_projector.bin."""
    p = Path(path)
    if p.is_dir():
        p = p / "projector.safetensors"
    if not p.is_file():
        raise ModelError(f"model.projector: '{path}' does not exist (expected a run folder with projector.safetensors, "
                         "a .safetensors file or LLaVA's mm_projector.bin)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(p))
    else:
        # The reference saves mm_projector.bin with torch.save; never unpickle arbitrary objects from it.
        try:
            raw = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ModelError(f"model.projector: '{path}' is not a tensor file ({e})") from None
    # Ours: multi_modal_projector.linear_{1,2}; the reference's: model.mm_projector.{0,2}.
    names = {"linear_1": ("multi_modal_projector.linear_1.", "mm_projector.0."),
             "linear_2": ("multi_modal_projector.linear_2.", "mm_projector.2.")}
    out = {}
    for key, tensor in raw.items():
        for target, prefixes in names.items():
            for prefix in prefixes:
                if prefix in key:
                    out[f"{target}.{key.split(prefix, 1)[1]}"] = tensor
    expected = {f"linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    if set(out) != expected:
        raise ModelError(f"model.projector: '{path}' holds {sorted(raw)[:6]}, not a 2-layer LLaVA projector")
    return out


def _model_key(recipe: Recipe) -> str:
    m = recipe.model
    return f"model.llava '{m.llava}'" if m.llava is not None else f"model.llm '{m.llm}'"


def _check_projector_shapes(path: str, weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]] | None,
                            model: str = "this model") -> None:
    """A projector of other shapes (one trained for 7B, given to 13B) is named with both shapes."""
    for key, shape in (expected or {}).items():
        if tuple(weights[key].shape) != tuple(shape):
            raise ModelError(
                f"model.projector: '{path}' has {key} of shape {tuple(weights[key].shape)}, but {model} needs "
                f"{tuple(shape)} (a projector trained for another LLM or vision tower?)"
            )


def load_projector(model, path: str, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Copy projector weights from ``path`` (or ``weights`` already read from it) into ``model``; shapes must match
    (a 7B projector does not fit 13B)."""
    weights = _read_projector(path) if weights is None else weights
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    projector = llava.model.multi_modal_projector
    state = projector.state_dict()
    _check_projector_shapes(path, weights, {k: tuple(v.shape) for k, v in state.items()})
    with torch.no_grad():
        for key, tensor in weights.items():
            state[key].copy_(tensor.to(state[key].dtype))
