"""Every error lora-llava raises on purpose, under one base class that carries the command's exit code.

The CLI maps errors to exit codes in one place (``cli.main``): ``exit_code`` 2 means the command, recipe or launch
is wrong (change what you typed), 1 means the work failed on its input (a bad record, image, model folder or run
folder). Messages name the file, record, key or path to change. The errors are ``ValueError`` s, so code that
catches bad input as ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["DataError", "ImageError", "InferenceError", "JudgeError", "LaunchError", "LoraLlavaError",
           "MergeError", "ModelError", "PlanError", "RecipeError", "ReportError", "StorageError", "UsageError"]


class LoraLlavaError(ValueError):
    """Base of lora-llava's errors; ``exit_code`` is what the ``lora-llava`` command exits with."""

    exit_code = 1


class UsageError(LoraLlavaError):
    """The command cannot run as asked (a missing argument, a path that is not a folder)."""

    exit_code = 2


class RecipeError(UsageError):
    """All problems found in one recipe, reported together."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"recipe {self.source}" if self.source else "recipe"
        n = len(self.problems)
        lines = [f"{where} has {n} problem{'s' if n != 1 else ''}:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class LaunchError(UsageError):
    """A distributed setup that cannot train this recipe; the message names the setting to change."""


class PlanError(UsageError):
    """Model shapes that cannot be found offline; names the recipe key."""


class DataError(LoraLlavaError):
    """A bad record or file. The message names the file, record index (0-based) and field."""


class ImageError(DataError):
    """An image that cannot be used; the message names the path."""


class ModelError(LoraLlavaError):
    """A model that cannot be built as asked; the message names the path or key to change."""


class MergeError(ModelError):
    """A merge or export that cannot be done as asked; the message names the path, module or option."""


class InferenceError(ModelError):
    """A model folder that cannot be loaded for inference, or a conversation that cannot be asked; names the path."""


class JudgeError(LoraLlavaError):
    """A judge endpoint that cannot be used (unreachable after retries, a refused key); names the URL, never the
    key."""


class StorageError(LoraLlavaError):
    """A run folder that could not be written while training (disk full, quota, permissions); names the folder and
    what is left to continue from."""


class ReportError(LoraLlavaError):
    """A run folder that cannot be read (missing, incomplete, no trainer state)."""
