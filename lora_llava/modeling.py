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

from .recipe import Recipe

logger = logging.getLogger(__name__)

__all__ = [
    "LORA_TARGETS",
    "ModelError",
    "UNQUANTIZED_MODULES",
    "build_model",
    "choose_attention",
    "load_llava",
    "load_projector",
    "lora_config",
    "model_summary",
    "num_image_tokens",
    "projector_parameters",
    "quantization_config",
    "resolve_dtype",
    "trainable_to_fp32",
]

UNQUANTIZED_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
"""Full module paths (transformers 5 names) that stay unquantized: a bare "multi_modal_projector" no longer matches."""
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_PROJECTOR = "multi_modal_projector"


class ModelError(ValueError):
    """A model that cannot be built as asked; the message names the path or key to change."""


def resolve_dtype(name: str) -> torch.dtype:
    """``model.dtype`` as a torch dtype; ``auto`` = bf16 on a GPU that has it, fp16 on one without, fp32 on CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def choose_attention(name: str) -> str:
    """The attention kernel: ``auto`` = flash_attention_2 when flash-attn and CUDA are there, else sdpa."""
    has_flash = _flash_attn_available()
    if name == "auto":
        chosen = "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"
        logger.info("attention kernel: %s (model.attn_implementation: auto)", chosen)
        return chosen
    if name == "flash_attention_2" and not (has_flash and torch.cuda.is_available()):
        why = "flash-attn is not installed (pip install 'lora-llava[flash]')" if not has_flash else "there is no GPU"
        raise ModelError(f"model.attn_implementation: flash_attention_2 asked but {why}; use sdpa or auto")
    return name


def _flash_attn_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def quantization_config(recipe: Recipe, compute_dtype: torch.dtype):
    """A ``BitsAndBytesConfig`` for ``quant.bits`` 4 or 8 (None for 16) that quantizes the language model only."""
    q = recipe.quant
    if q.bits == 16:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install raises anything
        raise ModelError(
            f"quant.bits: {q.bits} needs a working bitsandbytes ({e}); install it or set quant.bits: 16"
        ) from None
    from transformers import BitsAndBytesConfig

    kwargs = {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name != "bits"}
    if kwargs.get("bnb_4bit_compute_dtype") in (None, "auto"):
        kwargs["bnb_4bit_compute_dtype"] = compute_dtype
    return BitsAndBytesConfig(
        load_in_4bit=q.bits == 4,
        load_in_8bit=q.bits == 8,
        llm_int8_skip_modules=list(UNQUANTIZED_MODULES),
        **kwargs,
    )


def num_image_tokens(config) -> int:
    """Image tokens per image: (image size / patch size)^2, plus the CLS token with the ``full`` strategy."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def image_token_id(config) -> int:
    value = getattr(config, "image_token_id", None)
    return value if value is not None else config.image_token_index


def _check_checkpoint(path: str, key: str) -> None:
    p = Path(path)
    looks_local = p.is_absolute() or path.startswith((".", "~")) or p.exists() or path.count("/") != 1
    if looks_local and not p.exists():
        raise ModelError(f"{key}: '{path}' does not exist")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelError(f"{key}: '{path}' has no config.json; is it a model checkpoint folder?")


def load_llava(recipe: Recipe) -> tuple[Any, Any]:
    """Load a llava-hf checkpoint (``model.llava``) quantized as the recipe says. Returns (model, processor)."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    path = recipe.model.llava
    _check_checkpoint(path, "model.llava")
    remote = recipe.model.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    except OSError as e:
        raise ModelError(f"model.llava: '{path}' is not a local folder and could not be loaded from the Hub ({e})"
                         ) from None
    if config.model_type != "llava":
        raise ModelError(f"model.llava: '{path}' is a '{config.model_type}' checkpoint, not a llava-hf LLaVA")
    dtype = resolve_dtype(recipe.model.dtype)
    attn = choose_attention(recipe.model.attn_implementation)
    bnb = quantization_config(recipe, dtype)
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, quantization_config=bnb, attn_implementation=attn, device_map=device_map,
        trust_remote_code=remote,
    )
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=remote)
    return model, processor


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
    trained, vision tower and everything else frozen. Trainable parameters are kept in fp32 (mixed precision keeps
    fp32 master weights); the frozen model is not upcast.
    """
    model.requires_grad_(False)
    if recipe.train.stage == 2:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(recipe))
    for _, p in projector_parameters(model):
        p.requires_grad_(True)
    trainable_to_fp32(model)
    model.config.use_cache = False
    return model


def trainable_to_fp32(model) -> None:
    """Keep trainable weights in fp32 (mixed precision's master weights); frozen weights keep their dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def build_model(recipe: Recipe) -> tuple[Any, Any]:
    """The model to train (stage policy applied) and its processor, as the recipe says."""
    if recipe.model.llava is not None:
        model, processor = load_llava(recipe)
    else:
        raise ModelError("model.llm: assembling LLaVA from a Vicuna and a CLIP checkpoint is not available yet; "
                         "use model.llava with a llava-hf checkpoint")
    if processor.tokenizer.pad_token_id is None:
        raise ModelError(f"the tokenizer of '{recipe.model.llava}' has no pad token; llava-hf checkpoints add <pad>")
    if recipe.model.projector is not None:
        load_projector(model, recipe.model.projector)
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
    return {"total": total, "trainable": trainable, "lora": lora, "projector": projector,
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


def load_projector(model, path: str) -> None:
    """Copy projector weights from ``path`` into ``model``; shapes must match (a 7B projector does not fit 13B)."""
    weights = _read_projector(path)
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    projector = llava.model.multi_modal_projector
    state = projector.state_dict()
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise ModelError(
                f"model.projector: '{path}' has {key} of shape {tuple(tensor.shape)}, but this model needs "
                f"{tuple(state[key].shape)} (a projector trained for another LLM or vision tower?)"
            )
    with torch.no_grad():
        for key, tensor in weights.items():
            state[key].copy_(tensor.to(state[key].dtype))
