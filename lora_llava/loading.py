"""Read a LLaVA-1.5 model from one of three checkpoint layouts into a transformers ``LlavaForConditionalGeneration``.

1. llava-hf (``llava-hf/llava-1.5-13b-hf``): loaded as is.
2. original LLaVA (``liuhaotian/llava-v1.5-13b``): Llama keys + ``model.mm_projector.0/.2``, the vision tower named by
   ``mm_vision_tower`` in its config; converted on load (key renaming, no intermediate copy on disk).
3. from parts: a Vicuna / Llama checkpoint + a CLIP vision checkpoint (+ a fresh projector for stage 1).

In every case the language model's linear layers are quantized while loading (``quant.bits``), the vision tower,
projector and ``lm_head`` stay unquantized, the tokenizer gains ``<image>`` and ``<pad>`` the way the llava-hf
checkpoints do (vocabulary padded to a multiple of 64), and a ``LlavaProcessor`` (CLIP image processor + tokenizer)
comes back with the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from typing import Any

import torch

from .checkpoint_configs import (
    DEFAULT_VISION_TOWER,
    ModelError,
    _as_list,
    _text_config_from_original,
    checkpoint_layout,
    image_token_id,
    llava_config,
    num_image_tokens,
    original_text_fields,
    projector_shapes,
    read_config_dict,
)
from .recipe import Recipe

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_VISION_TOWER",
    "ModelError",
    "UNQUANTIZED_MODULES",
    "added_rows",
    "checkpoint_layout",
    "choose_attention",
    "image_token_id",
    "grow_vocabulary",
    "llava_config",
    "load_model",
    "num_image_tokens",
    "original_text_fields",
    "padded_vocab",
    "projector_shapes",
    "quantization_config",
    "read_config_dict",
    "resolve_dtype",
]

UNQUANTIZED_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
"""Full module paths (transformers 5 names) that stay unquantized: a bare "multi_modal_projector" no longer matches."""
IMAGE_TOKEN = "<image>"  # noqa: S105 - a token, not a password
PAD_TOKEN = "<pad>"  # noqa: S105 - a token, not a password
VOCAB_MULTIPLE = 64

# Original LLaVA -> llava-hf key names. Renamings apply in order; the last one must not catch what the first two made.
ORIGINAL_KEY_MAPPING = {
    r"^model\.mm_projector\.0\.": "model.multi_modal_projector.linear_1.",
    r"^model\.mm_projector\.2\.": "model.multi_modal_projector.linear_2.",
    r"^model\.(?!mm_projector\.|multi_modal_projector\.|vision_tower\.)": "model.language_model.",
}
LLM_KEY_MAPPING = {r"^model\.": "model.language_model."}


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


# --------------------------------------------------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass
class _Runtime:
    dtype: torch.dtype
    attn: str
    bnb: Any
    device_map: dict[str, Any]
    remote: bool


def _runtime(recipe: Recipe) -> _Runtime:
    from .distributed import detect_launch, device_map

    dtype = resolve_dtype(recipe.model.dtype)
    return _Runtime(dtype, choose_attention(recipe.model.attn_implementation), quantization_config(recipe, dtype),
                    device_map(detect_launch(recipe)), recipe.model.trust_remote_code)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a table of missing keys when parts are loaded separately; we report what we did instead."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_model(recipe: Recipe) -> tuple[Any, Any]:
    """The LLaVA model (quantized as the recipe says, no stage policy yet) and its processor.

    ``model.llava`` may be a llava-hf or an original LLaVA checkpoint; otherwise ``model.llm`` + ``model.vision_tower``
    are assembled.
    """
    m = recipe.model
    if m.llava is not None:
        config = read_config_dict(m.llava, "model.llava")
        layout = checkpoint_layout(config)
        if layout == "llava-hf":
            return _load_llava_hf(recipe)
        if layout == "llava-original":
            return _load_original(recipe, config)
        raise ModelError(f"model.llava: '{m.llava}' is a '{config.get('model_type', '?')}' checkpoint, not a LLaVA "
                         "(llava-hf or original layout); to assemble from a language model set model.llm instead")
    return _load_from_parts(recipe)


def _load_llava_hf(recipe: Recipe) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path, rt = recipe.model.llava, _runtime(recipe)
    if recipe.model.vision_tower is not None:
        raise ModelError(f"model.vision_tower: '{path}' is a llava-hf checkpoint that brings its own vision tower; "
                         "remove model.vision_tower")
    model = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=rt.dtype, quantization_config=rt.bnb, attn_implementation=rt.attn, device_map=rt.device_map,
        trust_remote_code=rt.remote,
    )
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=rt.remote)
    if processor.tokenizer.pad_token_id is None:
        raise ModelError(f"model.llava: the tokenizer of '{path}' has no pad token; llava-hf checkpoints add <pad>")
    logger.info("model: llava-hf checkpoint %s", path)
    return model, processor


def _load_original(recipe: Recipe, config: dict[str, Any]) -> tuple[Any, Any]:
    path = recipe.model.llava
    if config.get("model_type") not in ("llava_llama", "llava", None):
        raise ModelError(f"model.llava: '{path}' is an original LLaVA checkpoint of type '{config['model_type']}'; "
                         "only the Llama/Vicuna based LLaVA-1.5 (llava_llama) is supported")
    kind = config.get("mm_projector_type", "linear")
    if kind != "mlp2x_gelu":
        raise ModelError(f"model.llava: '{path}' has mm_projector_type '{kind}'; LLaVA-1.5 uses mlp2x_gelu")
    if config.get("mm_use_im_start_end"):
        raise ModelError(f"model.llava: '{path}' uses image start/end tokens (mm_use_im_start_end), which LLaVA-1.5 "
                         "does not; this checkpoint is not supported")
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ModelError(f"model.llava: '{path}' has mm_vision_select_feature '{select}' (expected patch)")
    vision = recipe.model.vision_tower or config.get("mm_vision_tower") or DEFAULT_VISION_TOWER
    return _assemble(
        recipe,
        weights=path,
        key="model.llava",
        text_config=_text_config_from_original(config),
        key_mapping=ORIGINAL_KEY_MAPPING,
        vision=vision,
        vision_key="model.vision_tower" if recipe.model.vision_tower else f"mm_vision_tower of '{path}'",
        feature_layer=config.get("mm_vision_select_layer", -2),
        strategy="default" if select == "patch" else "full",
        projector_in_checkpoint=True,
    )


def _load_from_parts(recipe: Recipe) -> tuple[Any, Any]:
    from transformers import AutoConfig

    path = recipe.model.llm
    config = read_config_dict(path, "model.llm")
    layout = checkpoint_layout(config)
    if layout != "llama":
        hint = "; set it as model.llava" if layout.startswith("llava") else ""
        raise ModelError(f"model.llm: '{path}' is a '{config.get('model_type', '?')}' checkpoint, not a Llama / "
                         f"Vicuna language model{hint}")
    text_config = AutoConfig.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
    return _assemble(
        recipe,
        weights=path,
        key="model.llm",
        text_config=text_config,
        key_mapping=LLM_KEY_MAPPING,
        vision=recipe.model.vision_tower or DEFAULT_VISION_TOWER,
        vision_key="model.vision_tower",
        feature_layer=-2,
        strategy="default",
        projector_in_checkpoint=False,
    )


def add_llava_tokens(tokenizer) -> None:
    """Add ``<image>`` and ``<pad>`` as the llava-hf checkpoints have them (32000 and 32001 on Vicuna's vocabulary)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token != PAD_TOKEN:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def added_rows(weight: torch.Tensor, new_rows: int) -> torch.Tensor:
    """Rows for added tokens: the mean of the existing rows (computed in fp32), the same for every new row.

    Deterministic on purpose: ``lora-llava merge`` recomputes them from the base weights and gets the same values,
    so an export equals the model that trained (transformers' own resizing draws them at random).
    """
    return weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(new_rows, -1).clone()


def padded_vocab(size: int) -> int:
    """The vocabulary padded to a multiple of 64, as the llava-hf checkpoints have it (32002 -> 32064)."""
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def grow_vocabulary(model, tokens: int) -> None:
    """Grow embeddings and ``lm_head`` to hold ``tokens`` tokens (padded to 64); new rows from :func:`added_rows`."""
    old = model.get_input_embeddings().weight.shape[0]
    new = padded_vocab(tokens)
    if new <= old:
        return
    embed_old = model.get_input_embeddings().weight.detach()
    head_old = model.get_output_embeddings().weight.detach()
    model.resize_token_embeddings(new, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[old:] = added_rows(embed_old, new - old)
        model.get_output_embeddings().weight[old:] = added_rows(head_old, new - old)


def _image_processor(vision: str, vision_config):
    from transformers import CLIPImageProcessor

    try:
        return CLIPImageProcessor.from_pretrained(vision)
    except (OSError, ValueError):
        # A vision checkpoint saved without its preprocessor: CLIP's own preprocessing at the tower's resolution.
        size = vision_config.image_size
        logger.info("vision tower %s has no preprocessor_config.json: CLIP's preprocessing at %d px", vision, size)
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _assemble(recipe: Recipe, *, weights: str, key: str, text_config, key_mapping: dict[str, str], vision: str,
              vision_key: str, feature_layer: int, strategy: str, projector_in_checkpoint: bool) -> tuple[Any, Any]:
    """Load the LLM's weights (renamed on the fly) into a LLaVA model, then the CLIP tower, then grow the vocabulary."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision_raw = read_config_dict(vision, vision_key)
    if checkpoint_layout(vision_raw) != "clip":
        raise ModelError(f"{vision_key}: '{vision}' is a '{vision_raw.get('model_type', '?')}' checkpoint, not a CLIP "
                         "vision model")
    rt = _runtime(recipe)
    vision_config = CLIPVisionConfig.from_pretrained(vision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(weights, trust_remote_code=rt.remote)
    except (OSError, ValueError) as e:
        raise ModelError(f"{key}: '{weights}' has no usable tokenizer ({e})") from None
    add_llava_tokens(tokenizer)
    config = llava_config(text_config, vision_config, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), feature_layer,
                          strategy)
    try:
        with _quiet_transformers():
            model, info = LlavaForConditionalGeneration.from_pretrained(
                weights, config=config, key_mapping=key_mapping, dtype=rt.dtype, quantization_config=rt.bnb,
                attn_implementation=rt.attn, device_map=rt.device_map, output_loading_info=True,
            )
    except (RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"{key}: could not load the weights of '{weights}' ({str(e).splitlines()[0][:300]})") from None
    expected_missing = ("model.vision_tower.",) + (() if projector_in_checkpoint else ("model.multi_modal_projector.",))
    missing = [k for k in info["missing_keys"] if not k.startswith(expected_missing)]
    if missing:
        raise ModelError(f"{key}: '{weights}' lacks {len(missing)} weights the model needs, e.g. {missing[:3]}")
    if info.get("mismatched_keys"):
        raise ModelError(f"{key}: '{weights}' has weights of the wrong shape, e.g. {list(info['mismatched_keys'])[:3]}")

    # transformers remembers the renaming to undo it on save; the model is a llava-hf model now and saves as one.
    ours = set(key_mapping)
    model._weight_conversions = [c for c in getattr(model, "_weight_conversions", None) or []
                                 if not ours & set(_as_list(getattr(c, "source_patterns", [])))] or None

    with _quiet_transformers():
        try:
            tower = CLIPVisionModel.from_pretrained(vision, dtype=rt.dtype, attn_implementation=rt.attn)
        except (RuntimeError, ValueError, OSError) as e:
            raise ModelError(f"{vision_key}: could not load '{vision}' ({str(e).splitlines()[0][:300]})") from None
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.vision_tower.to(device)
    del tower
    if not projector_in_checkpoint:
        # A fresh projector, initialised as the reference's nn.Linear layers are (PyTorch's default).
        for layer in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            layer.reset_parameters()

    old_vocab = model.get_input_embeddings().weight.shape[0]
    grow_vocabulary(model, len(tokenizer))
    model.config.pad_token_id = model.config.text_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=_image_processor(vision, vision_config), tokenizer=tokenizer,
        patch_size=vision_config.patch_size, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
    )
    projector = "from the checkpoint" if projector_in_checkpoint else "freshly initialised"
    logger.info("model: language model from %s, vision tower from %s, projector %s; vocabulary %d -> %d (<image> %d, "
                "<pad> %d)", weights, vision, projector, old_vocab, model.get_input_embeddings().weight.shape[0],
                config.image_token_id, tokenizer.pad_token_id)
    return model, processor
