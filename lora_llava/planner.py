"""Analytic peak-GPU-memory estimate for a recipe, from config shapes alone (nothing is downloaded or loaded).

The estimate is what ``torch.cuda.max_memory_allocated`` would report (tensors only), broken down by what holds the
memory; the fit verdict adds the CUDA context and allocator slack on top. The shapes come from the recipe's
:class:`~lora_llava.llava.spec.ModelSpec`; the config fields of the published Vicuna-7B/13B v1.5, LLaVA-1.5 and
CLIP ViT-L/14-336 checkpoints ship here, so the planner works offline for the shipped recipes; other checkpoints are
read from their local ``config.json``.

An AnyRes model (LLaVA-NeXT / LLaVA-1.5-HD) is planned at its worst case: every image cut into the most tiles its
grid allows (``data.max_tiles`` caps them), all of them plus the base view through the vision tower and the
projector, and the largest image-token count an image can take inside ``data.max_length``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .errors import ModelError, PlanError
from .llava.anyres import AnyresGrid, limit_tiles
from .llava.constants import DEFAULT_VISION_TOWER, V1_VISION_TOWER, padded_vocab
from .llava.spec import ModelSpec

__all__ = ["KNOWN_CONFIGS", "Plan", "Shapes", "plan", "shapes_for"]

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
    grid: AnyresGrid | None = None
    """The AnyRes grid (LLaVA-NeXT / LLaVA-1.5-HD), None for one view per image (LLaVA-1.5)."""

    @property
    def base_tokens(self) -> int:
        """Image tokens of one view (one tile): 576 for CLIP ViT-L/14-336."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_tokens(self) -> int:
        """The most image tokens one image can take."""
        return self.grid.worst_case if self.grid is not None else self.base_tokens

    @property
    def views(self) -> int:
        """Tower-sized views of one image at worst: the base view, plus the most tiles of the grid."""
        return 1 + self.grid.max_tiles if self.grid is not None else 1


# config.json fields of the published checkpoints (what the estimate needs of them).
_VICUNA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
_VICUNA_13B = {**_VICUNA_7B, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 40}
_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
_CLIP_L_224 = {**_CLIP_L_336, "image_size": 224}  # LLaVA v1's tower: 16 x 16 = 256 image tokens


def _llava_hf(text: dict) -> dict:
    return {"model_type": "llava", "text_config": {**text, "vocab_size": 32064}, "vision_config": _CLIP_L_336,
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default"}


def _original(text: dict) -> dict:
    return {**text, "model_type": "llava_llama", "mm_vision_tower": DEFAULT_VISION_TOWER, "mm_hidden_size": 1024,
            "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2}


_LLAVA16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _llava_next_hf(text: dict) -> dict:
    return {**_llava_hf(text), "model_type": "llava_next", "image_grid_pinpoints": _LLAVA16_PINPOINTS,
            "architectures": ["LlavaNextForConditionalGeneration"]}


def _original_next(text: dict) -> dict:
    return {**_original(text), "model_type": "llava", "image_aspect_ratio": "anyres",
            "image_grid_pinpoints": _LLAVA16_PINPOINTS, "mm_patch_merge_type": "spatial_unpad"}


KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "lmsys/vicuna-7b-v1.5": _VICUNA_7B,
    "lmsys/vicuna-13b-v1.5": _VICUNA_13B,
    # LLaMA-1 based Vicunas (2048 positions), what the LLaVA v1 recipes start from.
    "lmsys/vicuna-7b-v1.3": {**_VICUNA_7B, "max_position_embeddings": 2048},
    "lmsys/vicuna-13b-v1.3": {**_VICUNA_13B, "max_position_embeddings": 2048},
    "meta-llama/Llama-2-7b-hf": _VICUNA_7B,
    "meta-llama/Llama-2-13b-hf": _VICUNA_13B,
    "llava-hf/llava-1.5-7b-hf": _llava_hf(_VICUNA_7B),
    "llava-hf/llava-1.5-13b-hf": _llava_hf(_VICUNA_13B),
    "liuhaotian/llava-v1.5-7b": _original(_VICUNA_7B),
    "liuhaotian/llava-v1.5-13b": _original(_VICUNA_13B),
    "llava-hf/llava-v1.6-vicuna-7b-hf": _llava_next_hf(_VICUNA_7B),
    "llava-hf/llava-v1.6-vicuna-13b-hf": _llava_next_hf(_VICUNA_13B),
    "liuhaotian/llava-v1.6-vicuna-7b": _original_next(_VICUNA_7B),
    "liuhaotian/llava-v1.6-vicuna-13b": _original_next(_VICUNA_13B),
    DEFAULT_VISION_TOWER: _CLIP_L_336,
    V1_VISION_TOWER: _CLIP_L_224,
}
"""config.json of the published checkpoints the shipped recipes name, so ``plan`` needs no download."""


def shapes_for(recipe) -> Shapes:
    """The model's shapes from its :class:`ModelSpec` (local config files, or :data:`KNOWN_CONFIGS`)."""
    try:
        spec = ModelSpec.from_recipe(recipe, known=KNOWN_CONFIGS)
    except ModelError as e:
        raise PlanError(str(e)) from None
    t, v = spec.text, spec.vision_config
    vocab = t["vocab_size"]
    return Shapes(hidden=t["hidden_size"], intermediate=t["intermediate_size"], layers=t["num_hidden_layers"],
                  heads=t["num_attention_heads"], kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
                  # <image> and <pad> are added and the vocabulary padded to 64, as the llava-hf checkpoints do.
                  vocab=padded_vocab(vocab + 2) if vocab < 32064 else vocab,
                  vision_hidden=v.hidden_size, vision_intermediate=v.intermediate_size,
                  vision_layers=v.num_hidden_layers, image_size=v.image_size, patch_size=v.patch_size,
                  grid=spec.grid)


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


def plan(recipe, gpu_memory_gb: float, seq_len: int | None = None, shapes: Shapes | None = None) -> Plan:
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
    if s.grid is not None and recipe.data.max_tiles is not None:
        try:
            capped = limit_tiles(s.grid.pinpoints, s.grid.tile, recipe.data.max_tiles)
        except ValueError as e:
            raise PlanError(f"data.max_tiles: {e}") from None
        s = dataclasses.replace(s, grid=dataclasses.replace(s.grid, pinpoints=tuple(map(tuple, capped))))

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
    vision = s.vision_layers * (4 * vd * vd + 2 * vd * vi + 9 * vd + vi) + (s.base_tokens + 1) * vd + \
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
    if s.grid is not None:
        parts["image_newline (weights, grads, optimizer)"] = s.hidden * per_trainable
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
    # Embeddings with the image features scattered in, the projector's inputs/outputs for backward: on every view of
    # every image (AnyRes: the base view and all tiles, before un-padding), plus the packed features of an AnyRes
    # image (the grid rows, their newlines) that are scattered into the embeddings.
    parts["inputs embeds + projector activations"] = tokens * s.hidden * e * 2 + \
        images * s.views * s.base_tokens * (vd + 3 * s.hidden) * e + \
        (images * min(s.image_tokens, seq) * s.hidden * e * 2 if s.grid is not None else 0)
    # Answer-only loss: the LM head runs on supervised positions only; upper bound = every text token supervised
    # (AnyRes: an image takes at least its base view's tokens).
    supervised = batch * max(seq - (s.base_tokens if s.grid is not None else s.image_tokens), 1)
    parts["logits + loss (supervised tokens only)"] = supervised * s.vocab * (e + 12)
    if s.grid is None:
        notes.append(f"assumes every sample is {seq} tokens with one image ({s.image_tokens} image tokens) and every "
                     "text token supervised: an upper bound for real data")
    else:
        g = s.grid
        notes.append(f"AnyRes grid of {g.tile} px tiles ({', '.join(f'{h}x{w}' for h, w in g.pinpoints)}): assumes "
                     f"every sample is {seq} tokens with one image cut into {g.max_tiles} tiles + the base view "
                     f"({s.views} x {s.base_tokens} features through the tower and the projector, up to "
                     f"{s.image_tokens} image tokens) and every text token supervised: an upper bound for real data")
        if s.image_tokens >= seq:
            notes.append(f"an image can take {s.image_tokens} image tokens, more than data.max_length {seq}: such "
                         "samples are dropped, never cut (lora-llava data check --grid-pinpoints lists them); raise "
                         "data.max_length or cap data.max_tiles")
    return Plan(parts, notes, gpu_memory_gb * GiB, seq, batch)


def suggestions(recipe, gpu_memory_gb: float, seq_len: int | None = None) -> list[tuple[str, Plan]]:
    """Changes that make a recipe fit, each alone and then all together: (overrides, plan with them)."""
    from .config.recipe import recipe_from_dict

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
    grid = shapes_for(recipe).grid
    if grid is not None:
        # AnyRes: fewer tiles, not shorter samples (at 1024 tokens most high-resolution images would be dropped).
        tiles = min(grid.max_tiles, recipe.data.max_tiles or grid.max_tiles)
        if tiles > 2:
            options.append({"data.max_tiles": 2})
    elif recipe.data.max_length > 1024:
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


def format_plan(recipe, p: Plan, source: str, gpu_name: str) -> str:
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
