"""The projector's weights: which parameters they are, reading them from any file LLaVA keeps them in, checking their
shapes against the model, and putting them into a model.

A LLaVA-NeXT model's ``image_newline`` (one vector) counts as part of its projector here: it maps image features into
the language model's space, trains whenever the projector does (stage 1 and 2), and is saved and loaded with it (key
``image_newline`` in ``projector.safetensors``; ``model.image_newline`` in the original layout). A LLaVA-1.5 stage-1
projector has none: a NeXT model started from one keeps its fresh ``image_newline``.

A LLaVA v1 model (``model.image_tokens: start_end``) also trains the input embedding rows of ``<im_start>`` and
``<im_end>``; the projector file carries them too, as ``embed_tokens.rows`` (one row per id) and ``embed_tokens.ids``,
so the stage-1 artefact holds everything stage 1 trained and stage 2 starts from it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError, ModelError
from ..files import read_tensors
from ..llava.layouts import IMAGE_NEWLINE, projector_key

__all__ = ["PROJECTOR_MODULE", "ROW_IDS", "ROWS", "check_projector_shapes", "is_linear_projector", "load_projector",
           "projector_parameters", "projector_state", "read_projector", "token_rows", "trained_projector_parameters"]

PROJECTOR_MODULE = "multi_modal_projector"
ROWS = "embed_tokens.rows"
"""Key of the trained input-embedding rows (``<im_start>``, ``<im_end>``) in a projector file."""
ROW_IDS = "embed_tokens.ids"
"""Key of their token ids (int64)."""


def _is_newline(name: str) -> bool:
    return name == IMAGE_NEWLINE or name.endswith("." + IMAGE_NEWLINE)


def _llava(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_linear_projector(model) -> bool:
    """Is the projector LLaVA v1's single linear layer (identity activation, ``linear_2`` held at the identity)?"""
    return getattr(_llava(model).config, "projector_hidden_act", None) == "linear"


def trained_projector_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The projector parameters that train: all of them, but ``linear_2`` of a linear projector (the identity)."""
    linear = is_linear_projector(model)
    return [(n, p) for n, p in projector_parameters(model) if not (linear and ".linear_2." in f".{n}")]


def _trainable_tokens(model):
    """peft's trainable-tokens layer on the input embeddings (the rows that train), or None."""
    for module in model.modules():
        if hasattr(module, "trainable_tokens_delta") and "default" in getattr(module, "token_indices", {}):
            return module
    return None


def token_rows(model) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(ids, rows) of the input-embedding rows that train, as the model uses them now; None when none train."""
    layer = _trainable_tokens(model)
    if layer is None:
        return None
    ids = torch.tensor(layer.token_indices["default"], dtype=torch.int64)
    return ids, layer.trainable_tokens_delta["default"].detach().to("cpu", torch.float32).contiguous()


def projector_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the multimodal projector (and a NeXT model's ``image_newline``), whatever wraps the
    model."""
    return [(n, p) for n, p in model.named_parameters() if f".{PROJECTOR_MODULE}." in f".{n}" or _is_newline(n)]


def projector_state(model) -> dict[str, torch.Tensor]:
    """The projector's weights in fp32 with llava-hf key names (``multi_modal_projector.linear_1.weight`` ...,
    ``image_newline``), whatever wraps the model, plus the trained embedding rows of a v1 model."""
    state = {(IMAGE_NEWLINE if _is_newline(n) else f"{PROJECTOR_MODULE}." + n.split(f".{PROJECTOR_MODULE}.", 1)[-1]):
             p.detach().to("cpu", torch.float32).contiguous() for n, p in projector_parameters(model)}
    rows = token_rows(model)
    if rows is not None:
        state[ROW_IDS], state[ROWS] = rows
    return state


def read_projector(path: str | Path, key: str = "model.projector") -> dict[str, torch.Tensor]:
    """Projector weights as ``linear_1/linear_2`` tensors from a safetensors file or the reference's
    ``mm_projector.bin`` (a run folder's file is found by :class:`~lora_llava.run.RunFolder`)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{key}: '{path}' does not exist (expected a run folder with projector.safetensors, "
                         "a .safetensors file or LLaVA's mm_projector.bin)")
    # The reference saves mm_projector.bin with torch.save; never unpickle arbitrary objects from it.
    try:
        raw = read_tensors(p)
    except DataError as e:
        raise ModelError(f"{key}: {e}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{key}: '{path}' holds a {type(raw).__name__}, not a mapping of projector tensors")
    out = {}
    for name, tensor in raw.items():
        target = IMAGE_NEWLINE if _is_newline(name) else projector_key(name)
        if target is not None:
            out[target] = tensor
    if set(out) == {"linear_1.weight", "linear_1.bias"}:
        # LLaVA v1's single Linear (its mm_projector.bin): linear_2 is the identity.
        hidden = out["linear_1.weight"].shape[0]
        out["linear_2.weight"], out["linear_2.bias"] = torch.eye(hidden), torch.zeros(hidden)
    expected = {f"linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    if set(out) - {IMAGE_NEWLINE} != expected:
        raise ModelError(f"{key}: '{path}' holds {sorted(raw)[:6]}, not a LLaVA projector (2-layer or linear)")
    if ROWS in raw and ROW_IDS in raw:
        out[ROWS], out[ROW_IDS] = raw[ROWS], raw[ROW_IDS].to(torch.int64)
    elif "model.embed_tokens.weight" in raw:
        # The reference's v1 stage-1 file keeps the whole input embedding; its last two rows are <im_start> and
        # <im_end> (the reference reads them back the same way).
        embed = raw["model.embed_tokens.weight"]
        out[ROWS], out[ROW_IDS] = embed[-2:], torch.arange(embed.shape[0] - 2, embed.shape[0])
    return out


def check_projector_shapes(path: str | Path, weights: dict[str, torch.Tensor],
                           expected: dict[str, tuple[int, ...]], model: str = "this model",
                           key: str = "model.projector") -> None:
    """A projector of other shapes (one trained for 7B, given to 13B) is named with both shapes."""
    if IMAGE_NEWLINE in weights and IMAGE_NEWLINE not in expected:
        raise ModelError(f"{key}: '{path}' is a LLaVA-NeXT projector (it holds an image_newline), but {model} is a "
                         "LLaVA-1.5; set model.image_grid_pinpoints (e.g. 'default') to train LLaVA-NeXT / 1.5-HD")
    for name, shape in expected.items():
        if name not in weights:  # image_newline: a LLaVA-1.5 projector has none, the model keeps its fresh one
            continue
        if tuple(weights[name].shape) != tuple(shape):
            raise ModelError(
                f"{key}: '{path}' has {name} of shape {tuple(weights[name].shape)}, but {model} needs "
                f"{tuple(shape)} (a projector trained for another LLM or vision tower?)"
            )


def load_projector(model, weights: dict[str, torch.Tensor], path: str | Path = "the projector") -> None:
    """Copy projector weights (from :func:`read_projector`) into ``model``; shapes must match (a 7B projector does
    not fit 13B). ``path`` names where they came from in errors."""
    llava = _llava(model)
    state = dict(llava.model.multi_modal_projector.state_dict())
    newline = getattr(llava.model, IMAGE_NEWLINE, None)
    if newline is not None:
        state[IMAGE_NEWLINE] = newline.data
    check_projector_shapes(path, weights, {k: tuple(v.shape) for k, v in state.items()})
    with torch.no_grad():
        for name in state:
            if name in weights:  # image_newline: a LLaVA-1.5 projector has none, the model keeps its fresh one
                state[name].copy_(weights[name].to(state[name].dtype))
    if ROWS in weights:
        _load_rows(model, weights[ROW_IDS], weights[ROWS], path)


def _load_rows(model, ids: torch.Tensor, rows: torch.Tensor, path) -> None:
    """Put trained embedding rows into the model: into peft's trainable-tokens layer when the rows train (resuming),
    else into the input embedding itself."""
    layer = _trainable_tokens(model)
    with torch.no_grad():
        if layer is not None:
            if layer.token_indices["default"] != ids.tolist():
                raise ModelError(f"model.projector: '{path}' holds rows of tokens {ids.tolist()}, but this model "
                                 f"trains the rows of {layer.token_indices['default']}")
            delta = layer.trainable_tokens_delta["default"]
            delta.copy_(rows.to(delta.dtype))
            return
        weight = model.get_input_embeddings().weight
        if int(ids.max()) >= weight.shape[0] or rows.shape[1] != weight.shape[1]:
            raise ModelError(f"model.projector: '{path}' holds embedding rows {ids.tolist()} of width {rows.shape[1]} "
                             f"that do not fit this model's {tuple(weight.shape)} embeddings")
        weight[ids.to(weight.device)] = rows.to(weight.device, weight.dtype)
