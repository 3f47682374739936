"""Checkpoints of a run: what trains (adapter, projector) saved small, a completion marker written last, and the
choice of checkpoint for ``--resume``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from .data import DataError
from .modeling import load_projector, projector_parameters
from .recipe import Recipe

logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_MARKER", "PROJECTOR_FILE", "last_checkpoint", "load_trainable", "projector_state",
           "resolve_resume", "save_trainable"]

PROJECTOR_FILE = "projector.safetensors"
CHECKPOINT_MARKER = "lora_llava_complete.json"


def projector_state(model) -> dict[str, torch.Tensor]:
    """The projector's weights in fp32 with llava-hf key names (``multi_modal_projector.linear_1.weight`` ...),
    whatever wraps the model."""
    return {"multi_modal_projector." + n.split(".multi_modal_projector.", 1)[-1]:
            p.detach().to("cpu", torch.float32).contiguous() for n, p in projector_parameters(model)}


def save_trainable(model, folder: Path) -> None:
    """What a checkpoint keeps of the model: the LoRA adapter (when there is one) and the projector."""
    save_file(projector_state(model), str(folder / PROJECTOR_FILE), metadata={"format": "pt"})
    if any("lora_" in n for n, _ in model.named_parameters()):
        model.save_pretrained(str(folder), save_embedding_layers=False)


def load_trainable(model, folder: Path) -> None:
    """Put a checkpoint's adapter and projector back into ``model`` (the inverse of :func:`save_trainable`)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (folder / CHECKPOINT_MARKER).is_file():
        raise ValueError(f"checkpoint '{folder}' is incomplete (saving was interrupted); resume from an earlier one")
    load_projector(model, str(folder / PROJECTOR_FILE))
    adapter = folder / "adapter_model.safetensors"
    if adapter.is_file():
        result = set_peft_model_state_dict(model, load_file(str(adapter)))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"checkpoint '{folder}': adapter weights that this model does not have: {unexpected[:3]}")


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (one with the marker) of a run folder, or None."""
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if p.name.removeprefix("checkpoint-").isdigit() and (p / CHECKPOINT_MARKER).is_file()]
    return max(found, key=lambda p: int(p.name.removeprefix("checkpoint-")), default=None)


def resolve_resume(recipe: Recipe, resume: str | None) -> Path | None:
    """``--resume``: ``auto`` = the newest complete checkpoint of ``train.output_dir`` (None when there is none),
    or a checkpoint folder, which must be complete."""
    if resume is None:
        return None
    if resume == "auto":
        found = last_checkpoint(recipe.train.output_dir)
        if found is None:
            logger.info("--resume auto: no complete checkpoint in %s; starting from the beginning",
                        recipe.train.output_dir)
        return found
    path = Path(resume)
    if not path.is_dir():
        raise DataError(f"--resume: checkpoint '{resume}' does not exist")
    if not (path / CHECKPOINT_MARKER).is_file():
        raise DataError(f"--resume: checkpoint '{resume}' is incomplete (saving was interrupted); use --resume auto "
                        "or an earlier checkpoint")
    return path


