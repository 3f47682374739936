"""A run folder: the only place that knows its file names. Training writes it (every file atomically), resume,
merge, chat, generate and report read it.

::

    RUN/
      recipe.yaml               the resolved recipe
      projector.safetensors     the trained projector (fp32, llava-hf names)
      adapter/                  the LoRA adapter (stage 2; peft's adapter_config.json + adapter_model.safetensors)
      processor/                tokenizer + image processor
      trainer_state.json        transformers' trainer state (loss history)
      run_info.json             dtype the base was loaded in, vocabulary, lora-llava version, peak GPU memory
      data_report.json          what the records came to (kept, truncated, skipped)
      loss.png                  loss and learning rate against step
      checkpoint-N/             projector + adapter + optimizer / scheduler / RNG / trainer state,
        lora_llava_complete.json  written last: a checkpoint without it was cut short
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..files import atomic_dir, read_json, write_atomic, write_text_atomic

__all__ = ["RunFolder", "projector_file"]

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
        return f"RunFolder('{self.path}')"

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

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = [p for p in self.path.glob(f"{CHECKPOINT_PREFIX}*")
                 if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and self.is_complete(p)]
        return max(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)

    # ---------------------------------------------------------------------------------------------------------------
    # Writing: every file atomically, so a reader (or a crash) never sees half of one.

    def check_writable(self) -> None:
        """Create the folder and write (then remove) a probe file in it: an ``OSError`` now, not after training."""
        self.path.mkdir(parents=True, exist_ok=True)
        probe = self.path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()

    def write_recipe(self, recipe) -> None:
        write_text_atomic(self.recipe_file, recipe.to_yaml())

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


def write_projector(path: Path, tensors: dict) -> None:
    """Projector weights as safetensors, written atomically (run folders and checkpoints)."""
    from safetensors.torch import save_file

    write_atomic(path, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
