"""The projector's weights: which parameters they are, reading them from any file LLaVA keeps them in, checking their
shapes against the model, and putting them into a model.

A LLaVA-NeXT model's ``image_newline`` (one vector) counts as part of its projector here: it maps image features into
the language model's space, trains whenever the projector does (stage 1 and 2), and is saved and loaded with it (key
``image_newline`` in ``projector.safetensors``; ``model.image_newline`` in the original layout). A LLaVA-1.5 stage-1
projector has none: a NeXT model started from one keeps its fresh ``image_newline``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DataError, ModelError
from ..files import read_tensors
from ..llava.layouts import IMAGE_NEWLINE, projector_key

__all__ = ["PROJECTOR_MODULE", "check_projector_shapes", "load_projector", "projector_parameters", "projector_state",
           "read_projector"]

PROJECTOR_MODULE = "multi_modal_projector"


def _is_newline(name: str) -> bool:
    return name == IMAGE_NEWLINE or name.endswith("." + IMAGE_NEWLINE)


def projector_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the multimodal projector (and a NeXT model's ``image_newline``), whatever wraps the
    model."""
    return [(n, p) for n, p in model.named_parameters() if f".{PROJECTOR_MODULE}." in f".{n}" or _is_newline(n)]


def projector_state(model) -> dict[str, torch.Tensor]:
    """The projector's weights in fp32 with llava-hf key names (``multi_modal_projector.linear_1.weight`` ...,
    ``image_newline``), whatever wraps the model."""
    return {(IMAGE_NEWLINE if _is_newline(n) else f"{PROJECTOR_MODULE}." + n.split(f".{PROJECTOR_MODULE}.", 1)[-1]):
            p.detach().to("cpu", torch.float32).contiguous() for n, p in projector_parameters(model)}


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
    expected = {f"linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    if set(out) - {IMAGE_NEWLINE} != expected:
        raise ModelError(f"{key}: '{path}' holds {sorted(raw)[:6]}, not a 2-layer LLaVA projector")
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
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = dict(llava.model.multi_modal_projector.state_dict())
    newline = getattr(llava.model, IMAGE_NEWLINE, None)
    if newline is not None:
        state[IMAGE_NEWLINE] = newline.data
    check_projector_shapes(path, weights, {k: tuple(v.shape) for k, v in state.items()})
    with torch.no_grad():
        for name, tensor in weights.items():
            state[name].copy_(tensor.to(state[name].dtype))
