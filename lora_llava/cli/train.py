"""``lora-llava validate``, ``sft`` and ``plan``: the commands that take a recipe."""

from __future__ import annotations

import argparse

from ..errors import RecipeError, UsageError
from .common import load_recipe_arg, positive, positive_int, recipe_args

__all__ = ["cmd_plan", "cmd_sft", "cmd_validate", "plan_args", "sft_args", "validate_args"]


def _require_train_data(recipe, path: str) -> None:
    if not recipe.data.train:
        raise RecipeError(["data.train: no training data given (LLaVA JSON / JSONL files or Hugging Face datasets)"],
                          path)


def cmd_validate(args) -> int:
    """Check a recipe without loading any weights; print it resolved.

    Data files and the image folder must exist, unless --no-files; a missing file of LLaVA's published data says
    where to download it. Exit code 0 when the recipe is good, 2 when it is not (every problem is listed).
    """
    if args.keys:
        from ..config.sections import SECTIONS, section_keys

        for name in SECTIONS:
            print(f"{name}:")
            for key, typ, default, origin in section_keys(name):
                print(f"  {key}: {typ} = {default!r}  [{origin}]")
        return 0
    if args.recipe is None:
        raise UsageError("validate needs a RECIPE (or --keys)")
    recipe = load_recipe_arg(args, check_files=not args.no_files)
    _require_train_data(recipe, args.recipe)
    print(recipe.to_yaml(), end="")
    print(f"# {args.recipe}: OK (stage {recipe.train.stage}, template {recipe.template}, {recipe.quant.bits}-bit)")
    return 0


def validate_args(p: argparse.ArgumentParser) -> None:
    recipe_args(p, optional=True)
    p.add_argument("--keys", action="store_true", help="list every valid key of every section")
    p.add_argument("--no-files", action="store_true",
                   help="check the recipe alone, not whether its data files and image folder exist yet")


def cmd_sft(args) -> int:
    """Train: stage 1 (projector alignment) or stage 2 (LoRA + projector), as the recipe says."""
    recipe = load_recipe_arg(args)
    _require_train_data(recipe, args.recipe)
    from ..train.sft import train

    result = train(recipe, resume=args.resume, overwrite=args.overwrite)
    if not result.main_process:
        return 0
    losses = result.losses
    if losses:
        print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} logged steps")
    print(f"run folder: {result.output_dir}")
    if result.metrics is not None:
        print(result.metrics["summary"])
    return 0


def sft_args(p: argparse.ArgumentParser) -> None:
    recipe_args(p)
    p.add_argument("--resume", metavar="auto|CHECKPOINT",
                   help="continue a run: 'auto' = the newest complete checkpoint in train.output_dir (or start fresh "
                        "when there is none), or a checkpoint folder; weights, optimizer, scheduler, RNG and data "
                        "order are restored")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run (or an unfinished run's checkpoints) in train.output_dir; without it "
                        "sft refuses. Only the run's own files go: set aside at the start, deleted once the new run "
                        "is saved")


def cmd_plan(args) -> int:
    """Estimate the peak GPU memory of a recipe from config shapes alone (no weights, no GPU needed).

    Exit code 0 when it fits the GPU, 1 when it does not (the knobs that would make it fit are listed), 2 on a bad
    recipe or unknown model shapes.
    """
    recipe = load_recipe_arg(args, check_files=False)
    import torch

    from ..planner import GiB, format_plan, plan, suggestions

    if args.gpu_memory is not None:
        gb, name = args.gpu_memory, "the given GPU"
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gb, name = props.total_memory / GiB, props.name
    else:
        gb, name = 24.0, "an assumed consumer card (no GPU here; pass --gpu-memory)"
    estimate = plan(recipe, gb, seq_len=args.seq_len)
    print(format_plan(recipe, estimate, args.recipe, name))
    if estimate.fits:
        return 0
    fixes = [(o, p) for o, p in suggestions(recipe, gb, seq_len=args.seq_len) if p.fits]
    if fixes:
        print("these overrides would make it fit:")
        for overrides, p in fixes:
            print(f"  {overrides}   (needs {p.needed / GiB:.1f} GiB)")
    else:
        print("none of the knobs (alone or all together) makes it fit; a larger GPU or a smaller model is needed")
    return 1


def plan_args(p: argparse.ArgumentParser) -> None:
    recipe_args(p)
    p.add_argument("--gpu-memory", type=positive, metavar="GB",
                   help="GPU memory in GiB (default: the GPU here, else 24)")
    p.add_argument("--seq-len", type=positive_int, metavar="N",
                   help="plan for samples of N tokens instead of data.max_length (e.g. ~650 for stage-1 captions)")
