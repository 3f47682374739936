"""Typed recipes: one YAML file is one runnable experiment.

A recipe has the sections ``model``, ``quant``, ``lora``, ``data``, ``train`` (``demo`` for the offline demo, ``eval``
to evaluate after training). ``train`` maps onto :class:`trl.SFTConfig`, ``lora`` onto :class:`peft.LoraConfig` and
``quant`` onto :class:`transformers.BitsAndBytesConfig`: those sections are derived from the upstream classes
(:mod:`lora_llava.config.sections`), so every upstream field is accepted with its upstream type.

Every problem of a recipe (unknown key, wrong type, inconsistent values) is collected and raised together as one
:class:`RecipeError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import RecipeError
from ..llava.datasets import not_downloaded
from ..llava.spec import looks_local
from .sections import (
    LIST_FIELDS,
    OPTIONAL_SECTIONS,
    SECTIONS,
    DataSection,
    DemoSection,
    EvalSection,
    ModelSection,
)
from .types import type_name, type_ok

__all__ = ["Recipe", "apply_overrides", "load_recipe", "recipe_from_dict"]


# --------------------------------------------------------------------------------------------------------------------
# YAML: safe loading, plus scientific notation without a dot (``1e-4``) read as a float. YAML 1.1 reads it as a
# string, which is the most common recipe typo-that-is-not-a-typo.


class _RecipeLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        # YAML lets a later key silently replace an earlier one; in a recipe that is always a mistake.
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (lines {seen[key]} and {line}); the second would silently "
                    "replace the first", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


@dataclasses.dataclass
class Recipe:
    """A whole experiment. Build it with :func:`load_recipe` or :func:`recipe_from_dict`."""

    model: ModelSection
    quant: Any
    lora: Any
    data: DataSection
    train: Any
    demo: DemoSection | None = None
    eval: EvalSection | None = None
    source: str | None = None

    @property
    def template(self) -> str:
        """The conversation template in force (``data.template`` with ``auto`` resolved by stage)."""
        if self.data.template != "auto":
            return self.data.template
        return "plain" if self.train.stage == 1 else "vicuna_v1"

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        """The resolved recipe. Upstream fields left at the upstream default are omitted unless ``full``."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            if section is None:
                continue
            upstream_defaults = getattr(type(section), "upstream_defaults", {})
            values = {}
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if isinstance(value, enum.Enum):
                    value = value.value
                ours = f.metadata.get("origin") in (None, "lora-llava")
                keep = ours or f.name in getattr(section, "recipe_defaults", {})
                if not full and not keep:
                    if f.name in upstream_defaults and _same(value, upstream_defaults[f.name]):
                        continue
                values[f.name] = value
            out[name] = values
        return out

    def with_absolute_paths(self) -> Recipe:
        """A copy whose model and data paths that exist here are absolute (Hub ids and missing paths stay as given),
        so a run folder's recipe means the same from any working folder."""

        def absolute(path):
            return str(Path(path).resolve()) if isinstance(path, str) and path and Path(path).exists() else path

        model = dataclasses.replace(self.model, **{k: absolute(getattr(self.model, k))
                                                   for k in ("llava", "llm", "vision_tower", "projector")})
        d = self.data
        data = dataclasses.replace(d, train=[absolute(p) for p in d.train], eval=[absolute(p) for p in d.eval],
                                   image_folder=absolute(d.image_folder))
        return dataclasses.replace(self, model=model, data=data)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (what ``validate`` prints and each run folder keeps)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, enum.Enum):
        b = b.value
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - odd upstream defaults compare oddly; treat as different
        return False


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if len(valid) <= 12:
        return "valid keys: " + ", ".join(valid)
    return f"see `lora-llava validate --keys` for the {len(valid)} valid keys"


def _build_section(name: str, cls: type, raw: Any, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{name}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls) if not hasattr(cls, "derived_from") else {}
    managed = getattr(cls, "managed", {})
    kwargs = {}
    for key, value in raw.items():
        key = str(key)
        if key in managed:
            problems.append(f"{name}.{key}: set by lora-llava, not in a recipe ({managed[key]})")
            continue
        if key not in fields:
            problems.append(f"{name}.{key}: unknown key; {_suggest(key, list(fields))}")
            continue
        typ = hints.get(key, fields[key].type)
        if (name, key) in LIST_FIELDS and isinstance(value, str):
            value = [value]
        ok, conv = type_ok(value, typ)
        if not ok:
            problems.append(f"{name}.{key}: got {value!r} ({type(value).__name__}); expected {type_name(typ)}")
            continue
        kwargs[key] = conv
    return cls(**kwargs)


def recipe_from_dict(raw: Any, source: str | None = None, check_files: bool = True) -> Recipe:
    """Build and check a recipe from a plain mapping; raises :class:`RecipeError` with every problem found.

    ``check_files=False`` skips the checks that data files and the image folder exist.
    """
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], source)
    for key in raw:
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section; {_suggest(str(key), list(SECTIONS))}")
    built = {}
    for name, cls in SECTIONS.items():
        if name in OPTIONAL_SECTIONS and name not in raw:
            built[name] = None
            continue
        built[name] = _build_section(name, cls, raw.get(name), problems)
    recipe = Recipe(**built, source=source)
    problems += _cross_checks(recipe, check_files)
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _cross_checks(r: Recipe, check_files: bool = True) -> list[str]:
    """Problems that involve more than one field. Loads nothing.

    ``data.train`` may be empty here: Python callers can pass records to ``train()``; the CLI requires it.
    """
    p = []
    m = r.model
    if m.llava is None and m.llm is None:
        p.append("model: set model.llava (a LLaVA checkpoint) or model.llm (+ model.vision_tower) to assemble one")
    if m.llava is not None and m.llm is not None:
        p.append("model: set either model.llava or model.llm, not both")
    p += _pinpoint_problems(m.image_grid_pinpoints)
    if r.data.max_length < 8:
        p.append(f"data.max_length: {r.data.max_length} is too small to hold a prompt and an answer")
    if r.data.max_tiles is not None and r.data.max_tiles < 1:
        p.append(f"data.max_tiles: must be at least 1 (tiles per image, the base view not counted), got "
                 f"{r.data.max_tiles}")
    if r.lora.r <= 0:
        p.append(f"lora.r: must be positive, got {r.lora.r}")
    p += _range_problems(r)
    if r.train.trainable_dtype == "bfloat16" and r.model.dtype not in ("bfloat16", "auto"):
        p.append(f"train.trainable_dtype: bfloat16 needs model.dtype bfloat16 (or auto on a bf16 GPU), got "
                 f"'{r.model.dtype}'")
    p += _report_to_problems(r.train.report_to)
    p += _eval_problems(r, check_files)
    # Both choose the training sampler; transformers 5 spells its group_by_length as a train_sampling_strategy.
    if r.train.group_by_modality_length and r.train.train_sampling_strategy != "random":
        p.append(f"train.group_by_modality_length and train.train_sampling_strategy: both choose the training "
                 f"sampler; set group_by_modality_length: false or leave train_sampling_strategy at 'random' "
                 f"(got '{r.train.train_sampling_strategy}')")
    if check_files:
        # Model paths that look local must exist (Hub ids are looked up when the model loads).
        for key in ("llava", "llm", "vision_tower", "projector"):
            path = getattr(m, key)
            if path is not None and looks_local(path) and not Path(path).exists() and r.demo is None:
                p.append(f"model.{key}: '{path}' does not exist")
    if r.demo is None and check_files:
        published = False
        for key in ("train", "eval"):
            for path in getattr(r.data, key):
                if not Path(path).exists():
                    hint = not_downloaded(path)
                    published = published or hint is not None
                    p.append(f"data.{key}: file '{path}' " + (hint or "does not exist"))
        if r.data.image_folder is not None and not Path(r.data.image_folder).is_dir():
            why = "not downloaded yet (see data.train)" if published else "is not a folder"
            p.append(f"data.image_folder: '{r.data.image_folder}' {why}")
    return p


def _pinpoint_problems(pins) -> list[str]:
    """``model.image_grid_pinpoints``: ``default`` or ``[height, width]`` pairs of positive pixel counts (that they
    are multiples of the tower's tile size is checked when the tower's config is read)."""
    if pins is None or pins == "default":
        return []
    if not pins:
        return ["model.image_grid_pinpoints: an empty list; give [height, width] pairs (e.g. [[336, 672], [672, 336], "
                "[672, 672]]), 'default', or leave it unset for LLaVA-1.5"]
    bad = [pair for pair in pins if len(pair) != 2 or min(pair) <= 0]
    if bad:
        return [f"model.image_grid_pinpoints: {bad} are not [height, width] pairs of positive pixel counts"]
    return []


def _eval_problems(r: Recipe, check_files: bool) -> list[str]:
    e, p = r.eval, []
    if e is None:
        return p
    if e.questions is None and not (e.benchmark == "custom" and r.data.eval):
        p.append(f"eval.questions: {e.benchmark} needs its question file"
                 + (" (custom takes data.eval's first file when this is unset)" if e.benchmark == "custom" else ""))
    if e.benchmark != "custom" and e.annotations is None:
        p.append(f"eval.annotations: {e.benchmark} needs its ground truth to score against (see README, Evaluation)")
    for key, value, low in (("limit", e.limit, 1), ("batch_size", e.batch_size, 1),
                            ("max_new_tokens", e.max_new_tokens, 1)):
        if value is not None and value < low:
            p.append(f"eval.{key}: must be at least {low}, got {value}")
    if check_files and r.demo is None:
        for key in ("questions", "annotations", "image_folder"):
            path = getattr(e, key)
            if path is not None and not Path(path).exists():
                p.append(f"eval.{key}: '{path}' does not exist")
    return p


def _range_problems(r: Recipe) -> list[str]:
    """Values of the right type that cannot train (each one crashed or silently misbehaved after the model loaded)."""
    t, p = r.train, []
    checks = [
        ("train.learning_rate", t.learning_rate, t.learning_rate >= 0, "must be >= 0"),
        ("train.projector_lr", t.projector_lr, t.projector_lr is None or t.projector_lr >= 0, "must be >= 0"),
        ("train.per_device_train_batch_size", t.per_device_train_batch_size, t.per_device_train_batch_size >= 1,
         "must be at least 1"),
        ("train.per_device_eval_batch_size", t.per_device_eval_batch_size, t.per_device_eval_batch_size >= 1,
         "must be at least 1"),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps, t.gradient_accumulation_steps >= 1,
         "must be at least 1"),
        ("train.max_steps", t.max_steps, t.max_steps == -1 or t.max_steps >= 1,
         "must be at least 1 (or -1: train for num_train_epochs)"),
        ("train.num_train_epochs", t.num_train_epochs, t.max_steps >= 1 or t.num_train_epochs > 0,
         "must be > 0 when train.max_steps is not set"),
        ("train.logging_steps", t.logging_steps, t.logging_steps > 0, "must be > 0"),
        ("train.save_steps", t.save_steps, t.save_steps > 0, "must be > 0"),
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "must be >= 0 (a count, or a fraction below 1)"),
        ("lora.lora_dropout", r.lora.lora_dropout, 0 <= r.lora.lora_dropout < 1, "must be in [0, 1)"),
    ]
    for key, value, ok, rule in checks:
        if not ok:
            p.append(f"{key}: {rule}, got {value}")
    if t.bf16 and t.fp16:
        p.append("train.bf16 and train.fp16: choose one mixed precision, not both")
    return p


# train.report_to: the package each of transformers' reporting integrations needs.
_REPORT_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                    "comet_ml": ("comet_ml",), "trackio": ("trackio",), "swanlab": ("swanlab",)}


def _report_to_problems(report_to: Any) -> list[str]:
    """A ``train.report_to`` integration whose package is missing fails before training starts, not after loading."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    problems = []
    for name in names:
        packages = _REPORT_PACKAGES.get(name)
        if packages and not any(importlib.util.find_spec(m) is not None for m in packages):
            problems.append(f"train.report_to: '{name}' needs the {packages[0]} package (pip install {packages[0]})")
    return problems


# --------------------------------------------------------------------------------------------------------------------
# Overrides and loading.


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply ``section.key=value`` overrides (value parsed as YAML) to a raw recipe mapping.

    Returns the new mapping and the problems with malformed overrides; unknown keys are caught by the recipe check.
    """
    raw = copy.deepcopy(raw or {})
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}': expected section.key=value, e.g. train.learning_rate=1e-4")
            continue
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            problems.append(f"override '{item}': expected section.key=value, e.g. train.learning_rate=1e-4")
            continue
        try:
            value = _yaml_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"override '{item}': value is not valid YAML ({e.problem})")
            continue
        section, key = parts
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][key] = value
    return raw, problems


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_files: bool = True) -> Recipe:
    """Read a YAML recipe (safe-loaded), apply dotted overrides, and check it.

    Raises :class:`RecipeError` naming every problem, FileNotFoundError-style problems included.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise RecipeError([f"'{path}' is a folder; give the recipe's YAML file"], source)
    if not path.is_file():
        raise RecipeError([f"file '{path}' does not exist"], source)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark some editors write is read, not refused
    except UnicodeDecodeError as e:
        raise RecipeError([f"not UTF-8 text (byte {e.start}: {e.reason}); save the recipe as UTF-8"], source) from None
    try:
        raw = _yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError([f"not valid YAML{where}: {getattr(e, 'problem', e)}"], source) from None
    if raw is not None and not isinstance(raw, dict):
        raise RecipeError([f"the top level must be a mapping of sections (model, quant, lora, data, train), got "
                           f"{type(raw).__name__}"], source)
    raw, problems = apply_overrides(raw or {}, overrides or [])
    try:
        recipe = recipe_from_dict(raw, source, check_files=check_files)
    except RecipeError as e:
        raise RecipeError(problems + e.problems, source) from None
    if problems:
        raise RecipeError(problems, source)
    return recipe
