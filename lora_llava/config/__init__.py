"""The recipe: one YAML file is one runnable experiment. ``recipe`` loads, overrides and validates it; ``sections``
holds its sections' keys; ``types`` checks values against their annotations."""
