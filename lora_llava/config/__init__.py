"""The recipe: one YAML file is one runnable experiment. Sections, loading, overrides and validation."""

from .recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict
from .sections import SECTIONS, section_keys

__all__ = ["SECTIONS", "Recipe", "apply_overrides", "load_recipe", "recipe_from_dict", "section_keys"]
