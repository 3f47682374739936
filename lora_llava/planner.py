"""Analytic peak-GPU-memory estimate for a recipe, from config shapes alone (nothing is downloaded or loaded).

The estimate is what ``torch.cuda.max_memory_allocated`` would report (tensors only), broken down by what holds the
memory; the fit verdict adds the CUDA context and allocator slack on top. The shapes of Vicuna-7B/13B v1.5 and
CLIP ViT-L/14-336 ship here, so the planner works offline for the shipped recipes; other checkpoints are read from
their local ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .recipe import Recipe

__all__ = ["KNOWN_SHAPES", "Plan", "Shapes", "plan", "shapes_for"]

GiB = 1024**3
CUDA_CONTEXT = 0.6 * GiB  # CUDA context + cuBLAS workspaces: on the card, not in max_memory_allocated
ALLOCATOR_SLACK = 0.10  # fragmentation of the caching allocator


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the estimate needs to know about a model."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int  # after <image>/<pad> were added and the vocabulary padded to a multiple of 64
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    image_size: int
    patch_size: int

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


_VICUNA_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32, "vocab": 32000}
_VICUNA_13B = {"hidden": 5120, "intermediate": 13824, "layers": 40, "heads": 40, "kv_heads": 40, "vocab": 32000}
_CLIP_L_336 = {"vision_hidden": 1024, "vision_intermediate": 4096, "vision_layers": 24, "image_size": 336,
               "patch_size": 14}
KNOWN_SHAPES: dict[str, dict[str, int]] = {
    "lmsys/vicuna-7b-v1.5": _VICUNA_7B,
    "lmsys/vicuna-13b-v1.5": _VICUNA_13B,
    "meta-llama/Llama-2-7b-hf": _VICUNA_7B,
    "meta-llama/Llama-2-13b-hf": _VICUNA_13B,
    "llava-hf/llava-1.5-7b-hf": {**_VICUNA_7B, **_CLIP_L_336},
    "llava-hf/llava-1.5-13b-hf": {**_VICUNA_13B, **_CLIP_L_336},
    "liuhaotian/llava-v1.5-7b": {**_VICUNA_7B, **_CLIP_L_336},
    "liuhaotian/llava-v1.5-13b": {**_VICUNA_13B, **_CLIP_L_336},
    "openai/clip-vit-large-patch14-336": _CLIP_L_336,
}


class PlanError(ValueError):
    """Shapes that cannot be found offline; names the recipe key."""


def _local_config(path: str, key: str) -> dict[str, Any]:
    p = Path(path) / "config.json"
    if not p.is_file():
        raise PlanError(f"{key}: the shapes of '{path}' are unknown offline; give a local checkpoint folder (one with "
                        f"config.json) or one of: {', '.join(sorted(KNOWN_SHAPES))}")
    return json.loads(p.read_text(encoding="utf-8"))


def _text(c: dict[str, Any]) -> dict[str, int]:
    return {"hidden": c["hidden_size"], "intermediate": c["intermediate_size"], "layers": c["num_hidden_layers"],
            "heads": c["num_attention_heads"], "kv_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
            "vocab": c["vocab_size"]}


def _vision(c: dict[str, Any]) -> dict[str, int]:
    c = c.get("vision_config", c)
    return {"vision_hidden": c["hidden_size"], "vision_intermediate": c["intermediate_size"],
            "vision_layers": c["num_hidden_layers"], "image_size": c["image_size"], "patch_size": c["patch_size"]}


def _lookup(name: str, key: str) -> dict[str, Any]:
    if name in KNOWN_SHAPES:
        return dict(KNOWN_SHAPES[name])
    c = _local_config(name, key)
    if c.get("model_type") == "llava":
        return {**_text(c["text_config"]), **_vision(c["vision_config"])}
    if "mm_vision_tower" in c:  # original LLaVA: Llama fields + the tower's name
        return {**_text(c), **_lookup(c["mm_vision_tower"], f"mm_vision_tower of {name}")}
    if c.get("model_type") in ("clip", "clip_vision_model"):
        return _vision(c)
    return _text(c)


def shapes_for(recipe: Recipe) -> Shapes:
    """The model's shapes from the shipped table or local config files."""
    m = recipe.model
    if m.llava is not None:
        found = _lookup(m.llava, "model.llava")
        if m.vision_tower:
            found.update(_lookup(m.vision_tower, "model.vision_tower"))
    else:
        found = {**_lookup(m.llm, "model.llm"),
                 **_lookup(m.vision_tower or "openai/clip-vit-large-patch14-336", "model.vision_tower")}
    if found["vocab"] < 32064:
        # <image> and <pad> are added and the vocabulary padded to a multiple of 64, as the llava-hf checkpoints do.
        found["vocab"] = math.ceil((found["vocab"] + 2) / 64) * 64
    return Shapes(**found)


_OPTIMIZER_BYTES = {  # optimizer state per trainable parameter
    "adamw_torch": 8, "adamw_torch_fused": 8, "adamw_hf": 8, "adamw_apex_fused": 8, "paged_adamw_32bit": 8,
    "adamw_bnb_8bit": 2, "adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw": 8, "lion_8bit": 1,
    "paged_lion_8bit": 1, "lion_32bit": 4, "paged_lion_32bit": 4, "sgd": 0, "adagrad": 4, "adafactor": 1,
}


def _optim(value: Any) -> str:
    return str(getattr(value, "value", value))


@dataclasses.dataclass
class Plan:
    """The estimate: bytes per component, the total, and the verdict for a GPU size."""

    parts: dict[str, float]
    notes: list[str]
    gpu_bytes: float
    seq_len: int
    batch: int

    @property
    def peak(self) -> float:
        return sum(self.parts.values())

    @property
    def needed(self) -> float:
        """Peak tensors + allocator slack + the CUDA context: what the card must have."""
        return self.peak * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT

    @property
    def fits(self) -> bool:
        return self.needed <= self.gpu_bytes


def _linear_params(s: Shapes) -> int:
    head_dim = s.hidden // s.heads
    kv = s.kv_heads * head_dim
    attn = 2 * s.hidden * s.hidden + 2 * s.hidden * kv  # q, o + k, v
    return s.layers * (attn + 3 * s.hidden * s.intermediate)


def lora_params(s: Shapes, r: int, targets: list[str]) -> int:
    head_dim = s.hidden // s.heads
    kv = s.kv_heads * head_dim
    dims = {"q_proj": (s.hidden, s.hidden), "k_proj": (s.hidden, kv), "v_proj": (s.hidden, kv),
            "o_proj": (s.hidden, s.hidden), "gate_proj": (s.hidden, s.intermediate),
            "up_proj": (s.hidden, s.intermediate), "down_proj": (s.intermediate, s.hidden)}
    if isinstance(targets, str):  # a regex: count all seven projections
        targets = list(dims)
    return s.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)


def layer_activation_bytes(s: Shapes, tokens: int, e: int, lora: bool, dropout: bool, r: int) -> float:
    """Bytes autograd keeps for one Llama decoder layer's backward, at ``tokens`` tokens and ``e``-byte activations.

    Per token: ``8 e d + 3 e I`` for the frozen layer (both RMSNorms with their fp32 copies, q/k/v, rotated q/k,
    attention output, gate/up/SiLU/product), ``+ 12 e d + 2 e I + 14 r e`` with LoRA on all seven projections
    (the inputs the frozen 4-bit matmuls would not keep, the rank-r activations), ``+ 2 e (6 d + I)`` for LoRA dropout
    (output and mask per adapted projection). The coefficients were measured with autograd's saved-tensor hooks on
    transformers' Llama layer (bf16, 4-bit and 16-bit alike) and are checked against that measurement in
    ``tests/test_planner.py``.
    """
    d, i = s.hidden, s.intermediate
    per_token = 8 * e * d + 3 * e * i + 4 * s.heads
    if lora:
        per_token += 12 * e * d + 2 * e * i + 14 * r * e
        if dropout:
            per_token += 2 * e * (6 * d + i)
    return per_token * tokens


def plan(recipe: Recipe, gpu_memory_gb: float, seq_len: int | None = None, shapes: Shapes | None = None) -> Plan:
    """Estimate the peak GPU memory of training ``recipe`` (per device)."""
    s = shapes or shapes_for(recipe)
    t = recipe.train
    bits = recipe.quant.bits
    dtype = recipe.model.dtype
    e = 4 if dtype == "float32" else 2  # bf16/fp16 on a GPU (``auto`` = bf16 or fp16 there)
    stage2 = t.stage == 2
    seq = seq_len or recipe.data.max_length
    batch = t.per_device_train_batch_size
    tokens = batch * seq
    images = batch  # one image per sample (LLaVA-1.5 data)
    notes: list[str] = []
    parts: dict[str, float] = {}

    linear = _linear_params(s)
    if bits == 4:
        double = recipe.quant.bnb_4bit_use_double_quant
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if double else 4 / 64)  # packed NF4 + absmax per 64-weight block
        parts["LLM linear weights (4-bit NF4)"] = linear * per
    elif bits == 8:
        parts["LLM linear weights (8-bit)"] = linear * 1.0
    else:
        parts[f"LLM linear weights ({8 * e}-bit)"] = linear * e
    parts["embeddings + lm_head + norms"] = (2 * s.vocab * s.hidden + (2 * s.layers + 1) * s.hidden) * e
    vd, vi = s.vision_hidden, s.vision_intermediate
    vision = s.vision_layers * (4 * vd * vd + 2 * vd * vi + 9 * vd + vi) + (s.image_tokens + 1) * vd + \
        3 * s.patch_size**2 * vd + 4 * vd
    parts["vision tower (frozen)"] = vision * e

    opt = _OPTIMIZER_BYTES.get(_optim(t.optim))
    if opt is None:
        opt = 8
        notes.append(f"train.optim {t.optim}: state size unknown to the planner, counted as AdamW (8 bytes/param)")
    if t.trainable_dtype == "bfloat16":
        # bf16 weight + bf16 grad; a 32-bit optimizer keeps its state in the parameter's dtype (8-bit ones: 8 bits).
        per_trainable = 2 + 2 + (opt // 2 if opt >= 4 else opt)
    else:
        per_trainable = 4 + 4 + opt  # fp32 master weight + fp32 grad + optimizer state
    projector = vd * s.hidden + s.hidden + s.hidden * s.hidden + s.hidden
    parts["projector (weights, grads, optimizer)"] = projector * per_trainable
    n_lora = lora_params(s, recipe.lora.r, recipe.lora.target_modules) if stage2 else 0
    if stage2:
        parts[f"LoRA r={recipe.lora.r} (weights, grads, optimizer)"] = n_lora * per_trainable

    dropout = stage2 and recipe.lora.lora_dropout > 0
    layer = layer_activation_bytes(s, tokens, e, stage2, dropout, recipe.lora.r)
    if t.activation_checkpointing:
        # Each layer keeps its input; one layer at a time is recomputed with everything it saves.
        parts["activations (checkpointed layer inputs)"] = s.layers * tokens * s.hidden * e
        parts["activations (one recomputed layer)"] = layer
    else:
        parts["activations (all layers)"] = s.layers * layer
    # Backward working set: gradients of the hidden state and of the MLP intermediate, plus a dequantized weight.
    parts["backward working set"] = tokens * (2 * s.hidden + 2 * s.intermediate) * e + \
        (s.hidden * s.intermediate * e if bits == 4 else 0)
    # Embeddings with the image features scattered in, the projector's inputs/outputs for backward.
    parts["inputs embeds + projector activations"] = tokens * s.hidden * e * 2 + \
        images * s.image_tokens * (vd + 3 * s.hidden) * e
    # Answer-only loss: the LM head runs on supervised positions only; upper bound = every text token supervised.
    supervised = batch * max(seq - s.image_tokens, 1)
    parts["logits + loss (supervised tokens only)"] = supervised * s.vocab * (e + 12)
    notes.append(f"assumes every sample is {seq} tokens with one image ({s.image_tokens} image tokens) and every text "
                 "token supervised: an upper bound for real data")
    return Plan(parts, notes, gpu_memory_gb * GiB, seq, batch)


def suggestions(recipe: Recipe, gpu_memory_gb: float, seq_len: int | None = None) -> list[tuple[str, Plan]]:
    """Changes that make a recipe fit, each alone and then all together: (overrides, plan with them)."""
    from .recipe import recipe_from_dict

    raw = recipe.to_dict()
    t = recipe.train
    options: list[dict[str, Any]] = []
    if t.per_device_train_batch_size > 1:
        b = t.per_device_train_batch_size
        options.append({"train.per_device_train_batch_size": 1,
                        "train.gradient_accumulation_steps": t.gradient_accumulation_steps * b})
    if not t.activation_checkpointing:
        options.append({"train.activation_checkpointing": True})
    if recipe.quant.bits != 4:
        options.append({"quant.bits": 4})
    if _OPTIMIZER_BYTES.get(_optim(t.optim), 8) > 2:
        options.append({"train.optim": "paged_adamw_8bit"})
    if t.trainable_dtype == "float32" and recipe.model.dtype in ("auto", "bfloat16"):
        options.append({"train.trainable_dtype": "bfloat16"})
    if t.stage == 2 and recipe.lora.r > 64:
        options.append({"lora.r": 64, "lora.lora_alpha": 2 * 64})
    if recipe.data.max_length > 1024:
        options.append({"data.max_length": 1024})
    if len(options) > 1:
        options.append({k: v for o in options for k, v in o.items()})
    out = []
    for option in options:
        changed = json.loads(json.dumps(raw))
        for dotted, value in option.items():
            section, key = dotted.split(".")
            changed.setdefault(section, {})[key] = value
        r = recipe_from_dict(changed, check_files=False)
        p = plan(r, gpu_memory_gb, seq_len=None if "data.max_length" in option else seq_len)
        out.append((" ".join(f"{k}={v}" for k, v in option.items()), p))
    return out


def format_plan(recipe: Recipe, p: Plan, source: str, gpu_name: str) -> str:
    """The estimate as a table, with the verdict."""
    lines = [f"memory plan for {source} (stage {recipe.train.stage}, {recipe.quant.bits}-bit, "
             f"micro-batch {p.batch} x {p.seq_len} tokens, activation checkpointing "
             f"{'on' if recipe.train.activation_checkpointing else 'off'})", ""]
    width = max(len(k) for k in p.parts) + 2
    for name, value in p.parts.items():
        lines.append(f"  {name:<{width}} {value / GiB:8.2f} GiB")
    lines.append(f"  {'peak allocated (estimate)':<{width}} {p.peak / GiB:8.2f} GiB")
    lines.append(f"  {'+ allocator slack and CUDA context':<{width}} {(p.needed - p.peak) / GiB:8.2f} GiB")
    lines.append(f"  {'needed on the card':<{width}} {p.needed / GiB:8.2f} GiB")
    lines.append("")
    lines += [f"note: {n}" for n in p.notes]
    verdict = "fits" if p.fits else "does not fit"
    lines.append(f"verdict: {verdict} on {gpu_name} ({p.gpu_bytes / GiB:.0f} GiB)")
    return "\n".join(lines)
