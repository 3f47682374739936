"""A run folder: the only place that knows its file names. Training writes it (every file atomically), resume,
merge, chat, generate and report read it.

::

    RUN/
      recipe.yaml               the resolved recipe (local paths made absolute), written when training starts
      projector.safetensors     the trained projector (fp32, llava-hf names; a NeXT model's image_newline too)
      adapter/                  the LoRA adapter (stage 2; peft's adapter_config.json + adapter_model.safetensors)
      processor/                tokenizer + image processor (written when training starts)
      trainer_state.json        transformers' trainer state (loss history)
      run_info.json             dtype the base was loaded in, vocabulary, lora-llava version (written when training
                                starts), peak GPU memory (at the end)
      data_report.json          what the records came to (kept, truncated, skipped)
      loss.png                  loss and learning rate against step
      checkpoint-N/             projector + adapter + optimizer / scheduler / RNG / trainer state,
        lora_llava_complete.json  written last: a checkpoint without it was cut short

A run killed before its final save is usable through its checkpoints: :meth:`RunFolder.open` of ``RUN/checkpoint-N``
is a run folder whose recipe, processor and run info are the run's and whose projector and adapter are the
checkpoint's (merge, chat and generate take one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..files import atomic_dir, read_json, write_atomic, write_text_atomic

__all__ = ["CheckpointFolder", "RunFolder", "projector_file"]

PROJECTOR_FILE = "projector.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "lora_llava_complete.json"


def projector_file(path: str | Path) -> Path:
    """The projector file that ``model.projector`` names: a run folder's ``projector.safetensors``, or the file."""
    p = Path(path)
    return RunFolder(p).projector_file if p.is_dir() else p


class RunFolder:
    """The files of one run folder (``train.output_dir``); a checkpoint folder has the same projector and adapter
    files (the adapter at its top level)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.path}')"

    @staticmethod
    def open(path: str | Path) -> RunFolder:
        """The run folder at ``path``; a checkpoint ``RUN/checkpoint-N`` of a run as a :class:`CheckpointFolder`."""
        p = Path(path)
        if is_checkpoint_name(p.name) and RunFolder(p.parent).is_run() and not RunFolder(p).is_run():
            return CheckpointFolder(p)
        return RunFolder(p)

    # ---------------------------------------------------------------------------------------------------------------
    # Names.

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def projector_file(self) -> Path:
        return self.path / PROJECTOR_FILE

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def processor_dir(self) -> Path:
        return self.path / "processor"

    @property
    def trainer_state_file(self) -> Path:
        return self.path / "trainer_state.json"

    @property
    def info_file(self) -> Path:
        return self.path / "run_info.json"

    @property
    def data_report_file(self) -> Path:
        return self.path / "data_report.json"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @staticmethod
    def adapter_files(folder: Path) -> tuple[Path, Path]:
        """(weights, config) of the peft adapter saved in ``folder``."""
        return folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG

    def is_run(self) -> bool:
        """Does the folder hold a lora-llava run (its recipe)?"""
        return self.recipe_file.is_file()

    def is_finished(self) -> bool:
        """Did the run write its final results (the projector, saved at the end)?"""
        return self.projector_file.is_file()

    def unfinished_hint(self) -> str:
        """What to use instead of a run that did not finish: its newest complete checkpoint, if any."""
        checkpoint = self.last_checkpoint()
        if checkpoint is None:
            return "the run did not finish saving, and it has no complete checkpoint"
        return f"the run did not finish; its newest complete checkpoint is '{checkpoint}': give that folder instead"

    # ---------------------------------------------------------------------------------------------------------------
    # Reading.

    def read_recipe(self, overrides: list[str] | None = None):
        """The recipe the run trained with (data files are not checked: they may have moved since)."""
        from ..config.recipe import load_recipe

        return load_recipe(self.recipe_file, overrides, check_files=False)

    def read_info(self) -> dict[str, Any]:
        """``run_info.json`` ({} for a run that has none)."""
        return read_json(self.info_file, dict) if self.info_file.is_file() else {}

    def read_data_report(self) -> dict[str, Any]:
        """``data_report.json`` ({} for a run that has none)."""
        return read_json(self.data_report_file, dict) if self.data_report_file.is_file() else {}

    def state_file(self) -> Path | None:
        """The trainer state to report on: the run's own, or (a run stopped before its final save) that of its newest
        complete checkpoint, the one ``--resume auto`` takes; None when there is neither."""
        if self.trainer_state_file.is_file():
            return self.trainer_state_file
        checkpoint = self.last_checkpoint()
        return RunFolder(checkpoint).trainer_state_file if checkpoint is not None else None

    # ---------------------------------------------------------------------------------------------------------------
    # Checkpoints.

    def checkpoint(self, step: int) -> Path:
        return self.path / f"{CHECKPOINT_PREFIX}{step}"

    @staticmethod
    def is_complete(checkpoint: Path) -> bool:
        """Was the checkpoint written to the end (its marker is written last)?"""
        return (Path(checkpoint) / CHECKPOINT_MARKER).is_file()

    @staticmethod
    def mark_complete(checkpoint: Path, step: int) -> None:
        write_text_atomic(Path(checkpoint) / CHECKPOINT_MARKER, json.dumps({"step": step}))

    def checkpoints(self) -> list[Path]:
        """Every checkpoint folder, complete or not, oldest first."""
        found = [p for p in self.path.glob(f"{CHECKPOINT_PREFIX}*") if is_checkpoint_name(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = [p for p in self.checkpoints() if self.is_complete(p)]
        return found[-1] if found else None

    def run_files(self) -> list[Path]:
        """The files and folders of a run that exist here (what ``sft --overwrite`` replaces; nothing else)."""
        names = [self.recipe_file, self.projector_file, self.adapter_dir, self.processor_dir, self.trainer_state_file,
                 self.info_file, self.data_report_file, self.loss_plot]
        return [p for p in names if p.exists() or p.is_symlink()] + self.checkpoints()

    def set_aside(self) -> Path | None:
        """Move the run's own files (:meth:`run_files`, nothing else) into a hidden folder beside it, which the caller
        deletes once the run replacing them is saved; None when there was nothing to move."""
        files = self.run_files()
        if not files:
            return None
        try:
            aside = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.replaced-", dir=self.path.parent))
        except OSError:  # the folder above cannot be written: a hidden folder inside this one
            aside = Path(tempfile.mkdtemp(prefix=".replaced-", dir=self.path))
        for f in files:
            os.replace(f, aside / f.name)
        return aside

    @staticmethod
    def remove_set_aside(aside: Path | None) -> None:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------------------------
    # Writing: every file atomically, so a reader (or a crash) never sees half of one.

    def check_writable(self) -> None:
        """Create the folder and write (then remove) a probe file in it: an ``OSError`` now, not after training."""
        self.path.mkdir(parents=True, exist_ok=True)
        probe = self.path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()

    def write_recipe(self, recipe) -> None:
        """The recipe with its local model and data paths made absolute, so the run is usable from any folder."""
        write_text_atomic(self.recipe_file, recipe.with_absolute_paths().to_yaml())

    def write_projector(self, tensors: dict) -> None:
        write_projector(self.projector_file, tensors)

    def write_folder(self, folder: Path, save) -> None:
        """``save(tmp)`` writes a folder (adapter, processor), which then replaces ``folder``."""
        with atomic_dir(folder) as tmp:
            save(tmp)

    def write_trainer_state(self, state) -> None:
        """transformers' ``TrainerState`` as ``trainer_state.json``."""
        write_atomic(self.trainer_state_file, lambda p: state.save_to_json(str(p)))

    def write_json(self, path: Path, value: Any) -> None:
        write_text_atomic(path, json.dumps(value, indent=1))

    def write_loss_plot(self, log_history: list[dict]) -> Path:
        from .plot import plot_loss

        return write_atomic(self.loss_plot, lambda p: plot_loss(log_history, p))


def is_checkpoint_name(name: str) -> bool:
    """``checkpoint-N``?"""
    return name.startswith(CHECKPOINT_PREFIX) and name.removeprefix(CHECKPOINT_PREFIX).isdigit()


class CheckpointFolder(RunFolder):
    """A checkpoint ``RUN/checkpoint-N`` read as a run folder: the recipe, processor, run info and data report are the
    run's; the projector, adapter (at the checkpoint's top level) and trainer state its own."""

    @property
    def run(self) -> RunFolder:
        return RunFolder(self.path.parent)

    @property
    def recipe_file(self) -> Path:
        return self.run.recipe_file

    @property
    def adapter_dir(self) -> Path:
        return self.path

    @property
    def processor_dir(self) -> Path:
        return self.run.processor_dir

    @property
    def info_file(self) -> Path:
        return self.run.info_file

    @property
    def data_report_file(self) -> Path:
        return self.run.data_report_file

    def is_finished(self) -> bool:
        return self.is_complete(self.path)

    def unfinished_hint(self) -> str:
        return "the checkpoint is incomplete (saving was interrupted); " + self.run.unfinished_hint()


def write_projector(path: Path, tensors: dict) -> None:
    """Projector weights as safetensors, written atomically (run folders and checkpoints)."""
    from safetensors.torch import save_file

    write_atomic(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
