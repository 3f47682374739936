"""Checkpoints of a run: what trains (adapter, projector) saved small, and the choice of checkpoint for ``--resume``.

The files and the completion marker are :class:`~lora_llava.run.folder.RunFolder`'s; the trainer writes the marker
last (see :mod:`lora_llava.train.trainer`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DataError, ModelError
from ..model.projector import load_projector, projector_state, read_projector
from ..run.folder import RunFolder, write_projector

logger = logging.getLogger(__name__)

__all__ = ["load_trainable", "resolve_resume", "save_trainable"]


def save_trainable(model, folder: Path) -> None:
    """What a checkpoint keeps of the model: the LoRA adapter (when there is one) and the projector."""
    write_projector(RunFolder(folder).projector_file, projector_state(model))
    if any("lora_" in n for n, _ in model.named_parameters()):
        model.save_pretrained(str(folder), save_embedding_layers=False)


def load_trainable(model, folder: Path) -> None:
    """Put a checkpoint's adapter and projector back into ``model`` (the inverse of :func:`save_trainable`)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not RunFolder.is_complete(folder):
        raise ModelError(f"checkpoint '{folder}' is incomplete (saving was interrupted); resume from an earlier one")
    source = RunFolder(folder).projector_file
    load_projector(model, read_projector(source), source)
    adapter, _ = RunFolder.adapter_files(folder)
    if adapter.is_file():
        result = set_peft_model_state_dict(model, load_file(str(adapter)))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ModelError(f"checkpoint '{folder}': adapter weights that this model does not have: {unexpected[:3]}")


def resolve_resume(recipe, resume: str | None) -> Path | None:
    """``--resume``: ``auto`` = the newest complete checkpoint of ``train.output_dir`` (None when there is none),
    or a checkpoint folder, which must be complete."""
    if resume is None:
        return None
    if resume == "auto":
        found = RunFolder(recipe.train.output_dir).last_checkpoint()
        if found is None:
            logger.info("--resume auto: no complete checkpoint in %s; starting from the beginning",
                        recipe.train.output_dir)
        return found
    path = Path(resume)
    if not path.is_dir():
        raise DataError(f"--resume: checkpoint '{resume}' does not exist")
    if not RunFolder.is_complete(path):
        raise DataError(f"--resume: checkpoint '{resume}' is incomplete (saving was interrupted); use --resume auto "
                        "or an earlier checkpoint")
    return path
