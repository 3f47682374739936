"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse

__all__ = ["load_recipe_arg", "non_negative", "positive", "positive_int", "recipe_args"]


def recipe_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    """RECIPE and its dotted overrides."""
    p.add_argument("recipe", nargs="?" if optional else None, help="path to a YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override recipe values, e.g. train.max_steps=50 lora.r=16")


def load_recipe_arg(args, check_files: bool = True):
    """The recipe named on the command line (a :class:`RecipeError` names every problem)."""
    from ..config.recipe import load_recipe

    return load_recipe(args.recipe, args.overrides, check_files=check_files)


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def non_negative(value: str) -> float:
    x = float(value)
    if not x >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return x


def positive(value: str) -> float:
    x = float(value)
    if not x > 0 or x == float("inf"):  # NaN, 0, negatives and infinity
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return x
