"""Load a LLaVA-1.5 into a transformers ``LlavaForConditionalGeneration`` from the recipe's :class:`ModelSpec`.

1. llava-hf (``llava-hf/llava-1.5-13b-hf``): loaded as is.
2. original LLaVA (``liuhaotian/llava-v1.5-13b``): Llama keys + ``model.mm_projector.0/.2``, the vision tower named by
   ``mm_vision_tower`` in its config; converted on load (key renaming, no intermediate copy on disk).
3. from parts: a Vicuna / Llama checkpoint + a CLIP vision checkpoint (+ a fresh projector for stage 1).

In every case the language model's linear layers are quantized while loading (``quant.bits``), the vision tower,
projector and ``lm_head`` stay unquantized, the tokenizer gains ``<image>`` and ``<pad>`` the way the llava-hf
checkpoints do (vocabulary padded to a multiple of 64), and a ``LlavaProcessor`` (CLIP image processor + tokenizer)
comes back with the model.

With grid resolutions (``model.image_grid_pinpoints``, a ``llava_next`` checkpoint, an original LLaVA-1.6) the model
is a ``LlavaNextForConditionalGeneration`` with a ``LlavaNextProcessor`` instead (LLaVA-1.5-HD / NeXT AnyRes; see
:mod:`lora_llava.model.next`).

The original LLaVA (v1, ``model.projector_type: linear``, ``model.image_tokens: start_end``) is the same model with an
identity activation and ``linear_2`` set to the identity, and ``<im_start>`` / ``<im_end>`` added between ``<image>``
and ``<pad>``.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import torch

from ..errors import ModelError
from ..llava.constants import IMAGE_TOKEN, padded_vocab
from ..llava.layouts import FROM_PRETRAINED_KEY_MAPPING
from ..llava.spec import ModelSpec, llava_config
from ..llava.tokenizer import add_llava_tokens, image_token_id, image_wrap_ids, load_folder_tokenizer
from .next import init_image_newline, next_image_processor, next_processor
from .runtime import Runtime, quiet_transformers, runtime

logger = logging.getLogger(__name__)

__all__ = ["added_rows", "grow_vocabulary", "load_model", "set_identity"]


def load_model(recipe, spec: ModelSpec | None = None, device_map: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The LLaVA model (quantized as the recipe says, no stage policy yet) and its processor.

    ``spec`` is the recipe's :class:`ModelSpec` when the caller has it already; ``device_map`` where the weights go
    (default: the current CUDA device, or the CPU).
    """
    spec = spec or ModelSpec.from_recipe(recipe)
    rt = runtime(recipe, device_map)
    if spec.layout == "llava-hf":
        return _load_llava_hf(spec, rt)
    return _assemble(spec, rt)


_LOAD_ERRORS = (RuntimeError, ValueError, OSError, pickle.UnpicklingError)
"""What transformers' ``from_pretrained`` raises on weights it cannot read (damaged files, pickles)."""


def _weights_error(key: str, path: str, e: Exception) -> ModelError:
    """A :class:`ModelError` for weights that ``from_pretrained`` could not read."""
    if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e):
        return ModelError(f"{key}: '{path}' has .bin weights that pickle Python objects besides tensors; lora-llava "
                          "never unpickles those (it could run code): only safetensors and weights-only .bin files "
                          "are read. Convert the checkpoint to safetensors where it was made (or from a source you "
                          "trust)")
    return ModelError(f"{key}: could not load the weights of '{path}' ({str(e).splitlines()[0][:300]})")


def _classes(spec: ModelSpec):
    """(config class, model class) of the spec: LLaVA-NeXT's when it has grid resolutions."""
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    return (LlavaNextConfig, LlavaNextForConditionalGeneration) if spec.is_next else (
        LlavaConfig, LlavaForConditionalGeneration)


def _load_llava_hf(spec: ModelSpec, rt: Runtime) -> tuple[Any, Any]:
    from transformers import AutoProcessor

    config_class, model_class = _classes(spec)
    try:
        model = model_class.from_pretrained(
            spec.path, config=config_class.from_dict(spec.config), dtype=rt.dtype, quantization_config=rt.bnb,
            attn_implementation=rt.attn, device_map=rt.device_map, trust_remote_code=rt.remote,
        )
    except _LOAD_ERRORS as e:
        raise _weights_error(spec.key, spec.path, e) from None
    processor = AutoProcessor.from_pretrained(spec.path, trust_remote_code=rt.remote)
    if spec.is_next:
        if not hasattr(processor.image_processor, "image_grid_pinpoints"):
            raise ModelError(f"{spec.key}: '{spec.path}' is a LLaVA-NeXT checkpoint whose image processor "
                             f"({type(processor.image_processor).__name__}) does not cut images into grids")
        # model.image_grid_pinpoints may narrow the checkpoint's set: the processor must count as the model does.
        processor.image_processor.image_grid_pinpoints = [list(p) for p in spec.pinpoints]
    has_wrap = image_wrap_ids(processor.tokenizer) is not None
    if has_wrap != spec.start_end:
        found = "start_end" if has_wrap else "plain"
        raise ModelError(f"model.image_tokens: '{'start_end' if spec.start_end else 'plain'}', but the tokenizer of "
                         f"'{spec.path}' {'has' if has_wrap else 'lacks'} <im_start>/<im_end>; set model.image_tokens: "
                         f"{found}")
    if processor.tokenizer.pad_token_id is None:
        raise ModelError(f"{spec.key}: the tokenizer of '{spec.path}' has no pad token; llava-hf checkpoints add "
                         "<pad>")
    logger.info("model: llava-hf checkpoint %s", spec.path)
    return model, processor


def added_rows(weight: torch.Tensor, new_rows: int) -> torch.Tensor:
    """Rows for added tokens: the mean of the existing rows (computed in fp32), the same for every new row.

    Deterministic on purpose: ``lora-llava merge`` recomputes them from the base weights and gets the same values,
    so an export equals the model that trained (transformers' own resizing draws them at random).
    """
    return weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(new_rows, -1).clone()


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


def set_identity(linear) -> None:
    """Make a square ``nn.Linear`` the identity (weight I, bias 0): the ``linear_2`` of a linear (LLaVA v1)
    projector, which then passes ``linear_1``'s output through unchanged, in any dtype."""
    with torch.no_grad():
        linear.weight.copy_(torch.eye(linear.weight.shape[0], dtype=linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.zero_()


def _image_processor(vision: str, vision_config):
    from transformers import CLIPImageProcessor

    try:
        return CLIPImageProcessor.from_pretrained(vision)
    except (OSError, ValueError):
        # A vision checkpoint saved without its preprocessor: CLIP's own preprocessing at the tower's resolution.
        size = vision_config.image_size
        logger.info("vision tower %s has no preprocessor_config.json: CLIP's preprocessing at %d px", vision, size)
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _assemble(spec: ModelSpec, rt: Runtime) -> tuple[Any, Any]:
    """Load the LLM's weights (renamed on the fly) into a LLaVA model, then the CLIP tower, then grow the vocabulary."""
    from transformers import LlavaProcessor

    weights, key, vision = spec.path, spec.key, spec.vision_path
    projector_in_checkpoint = spec.layout == "llava-original"
    key_mapping = FROM_PRETRAINED_KEY_MAPPING["llava-original" if projector_in_checkpoint else "llama"]
    try:
        tokenizer = load_folder_tokenizer(weights, trust_remote_code=rt.remote)
    except (OSError, ValueError) as e:
        raise ModelError(f"{key}: '{weights}' has no usable tokenizer ({e})") from None
    add_llava_tokens(tokenizer, start_end=spec.start_end)
    linear = spec.projector_type == "linear"
    config = llava_config(spec.text_config(), spec.vision_config, image_token_id(tokenizer), spec.feature_layer,
                          spec.strategy, spec.pinpoints, projector_type=spec.projector_type)
    try:
        with quiet_transformers():
            model, info = _classes(spec)[1].from_pretrained(
                weights, config=config, key_mapping=key_mapping, dtype=rt.dtype, quantization_config=rt.bnb,
                attn_implementation=rt.attn, device_map=rt.device_map, output_loading_info=True,
            )
    except _LOAD_ERRORS as e:
        raise _weights_error(key, weights, e) from None
    expected_missing = ("model.vision_tower.",) + (
        ("model.multi_modal_projector.linear_2.",) if linear else ()) + (
        () if projector_in_checkpoint else ("model.multi_modal_projector.",))
    fresh_newline = spec.is_next and "model.image_newline" in info["missing_keys"]
    missing = [k for k in info["missing_keys"] if not k.startswith(expected_missing) and k != "model.image_newline"]
    if missing:
        raise ModelError(f"{key}: '{weights}' lacks {len(missing)} weights the model needs, e.g. {missing[:3]}")
    if info.get("mismatched_keys"):
        raise ModelError(f"{key}: '{weights}' has weights of the wrong shape, e.g. {list(info['mismatched_keys'])[:3]}")

    # transformers remembers the renaming to undo it on save; the model is a llava-hf model now and saves as one.
    ours = set(key_mapping)
    model._weight_conversions = [c for c in getattr(model, "_weight_conversions", None) or []
                                 if not ours & set(_patterns(c))] or None  # drop only our renamings

    tower_missing = [k for k in info["missing_keys"] if k.startswith("model.vision_tower.")]
    if spec.tower_in_checkpoint and tower_missing:
        raise ModelError(f"{key}: '{weights}' trained its vision tower (unfreeze_mm_vision_tower) but lacks its "
                         f"weights, e.g. {tower_missing[:2]}")
    if not spec.tower_in_checkpoint:
        _load_tower(model, spec, rt)
    if not projector_in_checkpoint:
        # A fresh projector, initialised as the reference's nn.Linear layers are (PyTorch's default).
        for layer in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            layer.reset_parameters()
    if fresh_newline:  # a LLaVA-1.5 (parts or checkpoint) turned NeXT: no image_newline there yet
        init_image_newline(model)
    if linear:
        set_identity(model.model.multi_modal_projector.linear_2)

    old_vocab = model.get_input_embeddings().weight.shape[0]
    grow_vocabulary(model, len(tokenizer))
    model.config.pad_token_id = model.config.text_config.pad_token_id = tokenizer.pad_token_id
    if spec.is_next:
        processor = next_processor(next_image_processor(_image_processor(vision, spec.vision_config), spec.pinpoints),
                                   tokenizer, spec.vision_config.patch_size, spec.strategy)
    else:
        processor = LlavaProcessor(
            image_processor=_image_processor(vision, spec.vision_config), tokenizer=tokenizer,
            patch_size=spec.vision_config.patch_size, vision_feature_select_strategy=spec.strategy,
            num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
        )
    projector = "from the checkpoint" if projector_in_checkpoint else "freshly initialised"
    if spec.is_next:
        projector += (", a fresh image_newline" if fresh_newline else "") + f"; AnyRes grids {list(spec.pinpoints)}"
    logger.info("model: language model from %s, vision tower from %s, projector %s; vocabulary %d -> %d (<image> %d, "
                "<pad> %d)", weights, vision, projector, old_vocab, model.get_input_embeddings().weight.shape[0],
                config.image_token_id, tokenizer.pad_token_id)
    return model, processor


def _load_tower(model, spec: ModelSpec, rt: Runtime) -> None:
    """The frozen CLIP tower's weights into ``model``, from the tower's own checkpoint."""
    from transformers import CLIPVisionModel

    with quiet_transformers():
        try:
            tower = CLIPVisionModel.from_pretrained(spec.vision_path, config=spec.vision_config, dtype=rt.dtype,
                                                    attn_implementation=rt.attn)
        except _LOAD_ERRORS as e:
            raise _weights_error(spec.vision_key, spec.vision_path, e) from None
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.vision_tower.to(device)


def _patterns(conversion) -> list:
    value = getattr(conversion, "source_patterns", [])
    return list(value) if isinstance(value, (list, tuple)) else [value]
