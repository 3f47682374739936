"""Checkpoints of a run: what trains (adapter, projector) saved small, and the choice of checkpoint for ``--resume``.

The files and the completion marker are :class:`~lora_llava.run.folder.RunFolder`'s; the trainer writes the marker
last (see :mod:`lora_llava.train.trainer`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DataError, ModelError, RecipeError
from ..files import read_tensors
from ..model.projector import load_projector, projector_state, read_projector
from ..run.folder import RunFolder, write_projector

logger = logging.getLogger(__name__)

__all__ = ["check_output_dir", "check_resumed_recipe", "load_trainable", "resolve_resume", "save_trainable"]

# Keys a resumed run may change freely: where and how often it logs and saves, how data is loaded.
_FREE_KEYS = ("train.output_dir", "train.logging_", "train.save_", "train.report_to", "train.run_name",
              "train.dataloader_", "train.disable_tqdm", "train.push_to_hub", "train.hub_", "data.num_proc",
              "data.cache")
# Keys whose change makes the checkpoint's weights not fit, or mean something else: refused.
_FIXED_KEYS = ("model.", "quant.", "lora.", "train.stage")


def save_trainable(model, folder: Path) -> None:
    """What a checkpoint keeps of the model: the LoRA adapter (when there is one) and the projector."""
    write_projector(RunFolder(folder).projector_file, projector_state(model))
    if any("lora_" in n for n, _ in model.named_parameters()):
        model.save_pretrained(str(folder), save_embedding_layers=False)


def load_trainable(model, folder: Path) -> None:
    """Put a checkpoint's adapter and projector back into ``model`` (the inverse of :func:`save_trainable`)."""
    from peft import set_peft_model_state_dict

    if not RunFolder.is_complete(folder):
        raise ModelError(f"checkpoint '{folder}' is incomplete (saving was interrupted); resume from an earlier one")
    source = RunFolder(folder).projector_file
    load_projector(model, read_projector(source), source)
    adapter, _ = RunFolder.adapter_files(folder)
    if adapter.is_file():
        try:
            weights = read_tensors(adapter)
        except DataError as e:
            raise ModelError(f"checkpoint '{folder}': {e}") from None
        result = set_peft_model_state_dict(model, weights)
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
    if RunFolder(path).is_run():
        latest = RunFolder(path).last_checkpoint()
        way = f"--resume auto (its newest complete checkpoint is '{latest}')" if latest else "a checkpoint folder"
        raise DataError(f"--resume: '{resume}' is a run folder, not a checkpoint (RUN/checkpoint-N); use {way}")
    if not RunFolder.is_complete(path):
        raise DataError(f"--resume: checkpoint '{resume}' is incomplete (saving was interrupted); use --resume auto "
                        "or an earlier checkpoint")
    return path


def check_output_dir(recipe, resume: str | None, checkpoint: Path | None, overwrite: bool) -> None:
    """Refuse to train into ``train.output_dir`` when that would replace a finished run or the checkpoints of an
    unfinished one, unless the run is resumed (``checkpoint``) or ``overwrite`` says to replace it."""
    run = RunFolder(recipe.train.output_dir)
    if overwrite or checkpoint is not None:
        return
    last = run.last_checkpoint()
    if run.is_finished():
        what = "a finished run"
    elif last is not None:
        what = "the checkpoints of an unfinished run"
    else:
        return
    ways = ([f"--resume auto to continue it (from '{last}')"] if last is not None and resume != "auto" else []) + \
        ["a new train.output_dir", "--overwrite to replace it (train(..., overwrite=True) in Python)"]
    extra = " and --resume auto found no checkpoint to continue from" if resume == "auto" else ""
    raise RecipeError([f"train.output_dir: '{run.path}' holds {what}{extra}; training would replace it. Use "
                       + ", or ".join(ways)], recipe.source)


def _flat(value, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.removesuffix("."): value}


def check_resumed_recipe(recipe, checkpoint: Path | None) -> None:
    """Compare the recipe of the run that wrote ``checkpoint`` with ``recipe``: refuse changes the checkpoint cannot
    take (model, quantization, LoRA, stage), warn about the rest (learning rates, steps, data: the schedule changes)."""
    if checkpoint is None:
        return
    saved_run = RunFolder(Path(checkpoint).parent)
    if not saved_run.is_run():
        return  # a checkpoint from elsewhere, or a run from before recipes were written at the start
    try:
        saved = saved_run.read_recipe()
    except RecipeError as e:
        logger.warning("the recipe of '%s' cannot be read (%s); not compared with this one", saved_run.path, e)
        return
    before = _flat(saved.to_dict(full=True))
    after = _flat(recipe.with_absolute_paths().to_dict(full=True))
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and not k.startswith(_FREE_KEYS))
    if not changed:
        return

    def show(k: str) -> str:
        return f"{k}: {before.get(k)!r} -> {after.get(k)!r}"

    fixed = [k for k in changed if k.startswith(_FIXED_KEYS)]
    if fixed:
        raise RecipeError([f"--resume: the checkpoint '{checkpoint}' was trained with another {show(k)}; it cannot "
                           "continue with this value (restore it, or start a new run in a new train.output_dir)"
                           for k in fixed], recipe.source)
    logger.warning("resuming '%s' with a changed recipe (the schedule continues from the checkpoint's step with the "
                   "new values): %s", checkpoint, "; ".join(show(k) for k in changed))
