"""How a model runs: dtype, attention kernel, quantization, and which device each process loads it on."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from typing import Any

import torch

from ..errors import ModelError
from ..llava.constants import UNQUANTIZED_MODULES

logger = logging.getLogger(__name__)

__all__ = ["Runtime", "choose_attention", "quantization_config", "quiet_transformers", "resolve_dtype", "runtime"]


def resolve_dtype(name: str) -> torch.dtype:
    """``model.dtype`` as a torch dtype; ``auto`` = bf16 on a GPU that has it, fp16 on one without, fp32 on CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


def choose_attention(name: str) -> str:
    """The attention kernel: ``auto`` = flash_attention_2 when flash-attn and CUDA are there, else sdpa."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        chosen = "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"
        logger.info("attention kernel: %s (model.attn_implementation: auto)", chosen)
        return chosen
    if name == "flash_attention_2" and not (has_flash and torch.cuda.is_available()):
        why = "flash-attn is not installed (pip install 'lora-llava[flash]')" if not has_flash else "there is no GPU"
        raise ModelError(f"model.attn_implementation: flash_attention_2 asked but {why}; use sdpa or auto")
    return name


def quantization_config(recipe, compute_dtype: torch.dtype):
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


@dataclasses.dataclass
class Runtime:
    """What ``from_pretrained`` needs besides the weights: dtype, attention, quantization, placement."""

    dtype: torch.dtype
    attn: str
    bnb: Any
    device_map: dict[str, Any]
    remote: bool


def runtime(recipe, device_map: dict[str, Any] | None = None) -> Runtime:
    """The :class:`Runtime` of a recipe. ``device_map`` (training passes the GPU of its local rank) defaults to the
    current CUDA device, or the CPU."""
    dtype = resolve_dtype(recipe.model.dtype)
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    return Runtime(dtype, choose_attention(recipe.model.attn_implementation), quantization_config(recipe, dtype),
                   device_map, recipe.model.trust_remote_code)


@contextlib.contextmanager
def quiet_transformers():
    """transformers prints a table of missing keys when parts are loaded separately; we report what we did instead."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
