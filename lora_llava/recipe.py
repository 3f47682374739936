"""Typed recipes: one YAML file is one runnable experiment.

A recipe has the sections ``model``, ``quant``, ``lora``, ``data``, ``train`` (and ``demo`` for the offline demo).
``train`` maps onto :class:`trl.SFTConfig`, ``lora`` onto :class:`peft.LoraConfig` and ``quant`` onto
:class:`transformers.BitsAndBytesConfig`: those sections are *derived* from the upstream classes at import time, so
every upstream field is accepted with its upstream type, and only LLaVA-specific fields are declared here.

Every problem of a recipe (unknown key, wrong type, inconsistent values) is collected and raised together as one
:class:`RecipeError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "DataSection",
    "DemoSection",
    "LoraSection",
    "ModelSection",
    "QuantSection",
    "Recipe",
    "RecipeError",
    "TrainSection",
    "apply_overrides",
    "load_recipe",
    "recipe_from_dict",
]


class RecipeError(ValueError):
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


# --------------------------------------------------------------------------------------------------------------------
# YAML: safe loading, plus scientific notation without a dot (``1e-4``) read as a float. YAML 1.1 reads it as a
# string, which is the most common recipe typo-that-is-not-a-typo.


class _RecipeLoader(yaml.SafeLoader):
    pass


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


# --------------------------------------------------------------------------------------------------------------------
# Hand-written sections: what is LLaVA-specific.


@dataclasses.dataclass
class ModelSection:
    """Where the weights come from and how the model runs."""

    llava: str | None = None
    """A LLaVA checkpoint to start from: llava-hf layout (``llava-hf/llava-1.5-13b-hf``) or original LLaVA layout
    (``liuhaotian/llava-v1.5-13b``, converted on load)."""
    llm: str | None = None
    """Language model checkpoint (Vicuna / Llama) when assembling LLaVA from parts."""
    vision_tower: str | None = None
    """CLIP vision checkpoint (frozen in both stages). Unset: ``openai/clip-vit-large-patch14-336`` with ``model.llm``,
    the checkpoint's ``mm_vision_tower`` for an original LLaVA checkpoint; a llava-hf checkpoint brings its own."""
    projector: str | None = None
    """Projector weights to start from (stage 2 after stage 1): a lora-llava run folder, its ``projector.safetensors``,
    or the reference's ``mm_projector.bin``."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Dtype of unquantized weights and compute; ``auto`` = bf16 on a GPU that has it, fp16 on one that does not,
    fp32 on the CPU."""
    trust_remote_code: bool = False


@dataclasses.dataclass
class DataSection:
    """Training data and how it becomes tokens."""

    train: list[str] = dataclasses.field(default_factory=list)
    """LLaVA-format JSON / JSONL files (one path or a list)."""
    eval: list[str] = dataclasses.field(default_factory=list)
    image_folder: str | None = None
    """Root folder that the records' ``image`` paths are relative to; paths cannot leave it."""
    template: Literal["auto", "vicuna_v1", "plain", "llava_v0"] = "auto"
    """Conversation template; ``auto`` = ``plain`` for stage 1, ``vicuna_v1`` for stage 2."""
    image_aspect_ratio: Literal["pad", "resize"] = "pad"
    max_length: int = 2048
    """Longest sample in tokens, 576 image tokens per image included."""
    padding_free: bool = False
    """Flatten each batch into one row with restarting ``position_ids`` (flash-attn varlen); no padding at all."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """``error``: stop at the first bad record, naming file, record and field; ``skip``: drop and count bad records."""
    image_position: Literal["first", "random"] = "first"
    """Where the image of the first question goes: ``first`` = ``<image>\\n`` + question (the reference);
    ``random`` = before or after the question at random (the LLaVA paper's augmentation)."""
    num_proc: int | None = None
    """Processes that tokenize the data; unset = one per CPU core (up to 16) for 5,000 samples or more."""
    cache: bool = True
    """Keep the tokenized data on disk, so the next run over the same data and tokenizer skips tokenization."""
    cache_dir: str | None = None
    """Where the tokenized data is kept; unset = ``$LORA_LLAVA_CACHE/tokenized`` (``~/.cache/lora_llava/tokenized``)."""


@dataclasses.dataclass
class DemoSection:
    """Only in the demo recipe: generate the tiny model and the coloured-shapes data when they are missing."""

    train_samples: int = 2000
    eval_samples: int = 120
    image_size: int = 48
    seed: int = 0


# --------------------------------------------------------------------------------------------------------------------
# Type checking against annotations (ours and upstream's).


def _type_name(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(typ))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(typ))
    if origin in (list, tuple, set):
        args = typing.get_args(typ)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if typ is type(None):
        return "null"
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        return " | ".join(repr(m.value) for m in typ)
    return getattr(typ, "__name__", str(typ))


def _type_ok(value: Any, typ: Any) -> tuple[bool, Any]:
    """Is ``value`` acceptable for ``typ``? Returns (ok, value converted where harmless: int -> float)."""
    if typ is Any or typ is typing.Any:
        return True, value
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            ok, conv = _type_ok(value, arg)
            if ok:
                return True, conv
        return False, value
    if origin is Literal:
        for a in typing.get_args(typ):
            if value == a and type(value) is type(a):
                return True, value
        return False, value
    if origin in (list, tuple, set):
        if not isinstance(value, list):
            return False, value
        args = typing.get_args(typ)
        if not args:
            return True, value
        conv = []
        for v in value:
            ok, c = _type_ok(v, args[0])
            if not ok:
                return False, value
            conv.append(c)
        return True, conv
    if origin is dict or typ is dict:
        return isinstance(value, dict), value
    if typ is type(None):
        return value is None, value
    if typ is bool:
        return isinstance(value, bool), value
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if typ is str:
        return isinstance(value, str), value
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        values = [m.value for m in typ]
        return value in values, value
    if isinstance(typ, type):
        return isinstance(value, typ), value
    return True, value  # an annotation we cannot check (a forward reference): leave it to the upstream class


# --------------------------------------------------------------------------------------------------------------------
# Derived sections: fields come from the upstream class, with LLaVA defaults and a few fields of our own.

_TRAIN_OURS: list[tuple[str, Any, Any, str]] = [
    ("stage", Literal[1, 2], 2, "1 = align the projector (projector only); 2 = LoRA + projector"),
    ("projector_lr", float | None, 2e-5, "learning rate of the projector in stage 2 (LLaVA-1.5: 2e-5)"),
    ("group_by_modality_length", bool, False,
     "batches of one modality (image or text-only) and of similar length, as LLaVA-1.5's fine-tuning does: less "
     "padding, and text-only batches skip the vision tower"),
    ("trainable_dtype", Literal["float32", "bfloat16"], "float32",
     "dtype of the trainable weights (LoRA, projector) and so of their optimizer state: float32 = fp32 master "
     "weights (the default), bfloat16 = half the memory of those weights and their gradients (needs model.dtype "
     "bfloat16)"),
]
# Defaults from LLaVA-1.5's reference hyperparameters (DESIGN.md section 2); everything else is SFTConfig's.
_TRAIN_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/lora-llava",
    "learning_rate": 2e-4,
    "num_train_epochs": 1.0,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "weight_decay": 0.0,
    # transformers 5 names (gradient_checkpointing* are deprecated aliases); non-reentrant works with frozen inputs.
    "activation_checkpointing": True,
    "activation_checkpointing_kwargs": {"use_reentrant": False},
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "no",
    "seed": 42,
}
# SFTConfig fields that lora-llava sets itself: the data path is ours (tokenization, masks, collator).
_TRAIN_MANAGED = {
    "remove_unused_columns": "lora-llava keeps its own columns",
    "dataset_kwargs": "lora-llava tokenizes the data itself",
    "dataset_text_field": "lora-llava tokenizes the data itself",
    "max_length": "use data.max_length",
    "packing": "use data.padding_free",
    "padding_free": "use data.padding_free",
    "completion_only_loss": "lora-llava masks labels itself (answer-only loss)",
    "assistant_only_loss": "lora-llava masks labels itself (answer-only loss)",
    "chat_template_path": "use data.template",
    "model_init_kwargs": "use the model and quant sections",
    "trust_remote_code": "use model.trust_remote_code",
    "do_train": "lora-llava decides",
    "do_eval": "lora-llava decides",
    "do_predict": "lora-llava decides",
}

_LORA_DEFAULTS: dict[str, Any] = {
    "r": 128,
    "lora_alpha": 256,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bias": "none",
}
_LORA_MANAGED = {
    "task_type": "set by lora-llava",
    "peft_type": "always LoRA",
    "base_model_name_or_path": "set by lora-llava",
    "revision": "set by lora-llava",
    "inference_mode": "set by lora-llava",
    "auto_mapping": "set by lora-llava",
    "runtime_config": "not a recipe setting",
}

_QUANT_OURS: list[tuple[str, Any, Any, str]] = [
    ("bits", Literal[4, 8, 16], 4, "4 = QLoRA (NF4), 8 = LLM.int8, 16 = no quantization (plain LoRA)"),
]
_QUANT_DEFAULTS: dict[str, Any] = {
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "auto",
}
_QUANT_MANAGED = {
    "load_in_4bit": "use quant.bits: 4",
    "load_in_8bit": "use quant.bits: 8",
    "llm_int8_skip_modules": "lora-llava keeps the vision tower, projector and lm_head unquantized",
}


def _upstream_fields(cls: type) -> list[tuple[str, Any, Any]]:
    """(name, type, default) of an upstream dataclass or of a class's ``__init__`` keywords."""
    params = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    # A dataclass whose __init__ is its own (BitsAndBytesConfig) is described by the signature, not the fields.
    if dataclasses.is_dataclass(cls) and set(params) <= {f.name for f in dataclasses.fields(cls)} | {"kwargs"}:
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            out.append((f.name, hints.get(f.name, Any), default))
        return out
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        # BitsAndBytesConfig has no annotations: the type follows the default; None-defaults take a dtype name.
        typ = type(default) if default is not None else (str | None)
        out.append((p.name, typ, default))
    return out


def _derive(
    name: str,
    upstream: type,
    defaults: dict[str, Any],
    managed: dict[str, str],
    ours: list[tuple[str, Any, Any, str]] = (),
    doc: str = "",
) -> type:
    fields = []
    for fname, typ, default, help_ in ours:
        fields.append((fname, typ, _field(default, help_, "lora-llava")))
    for fname, typ, default in _upstream_fields(upstream):
        if fname in managed:
            continue
        if fname in defaults:
            default = defaults[fname]
            # Our default may be outside the upstream annotation (compute dtype "auto"): widen the type.
            if not _type_ok(default, typ)[0]:
                typ = typ | type(default)
        fields.append((fname, typ, _field(default, "", upstream.__module__.split(".")[0] + "." + upstream.__name__)))
    cls = dataclasses.make_dataclass(name, fields, namespace={"__doc__": doc, "__module__": __name__})
    cls.upstream = upstream
    cls.managed = managed
    cls.upstream_defaults = {f: d for f, _, d in _upstream_fields(upstream)}
    cls.recipe_defaults = dict(defaults)
    return cls


def _field(default: Any, help_: str, origin: str) -> dataclasses.Field:
    meta = {"help": help_, "origin": origin}
    if isinstance(default, (list, dict, set)) or type(default).__hash__ is None:
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _sections() -> tuple[type, type, type]:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    train = _derive(
        "TrainSection",
        SFTConfig,
        _TRAIN_DEFAULTS,
        _TRAIN_MANAGED,
        _TRAIN_OURS,
        "Training loop settings: every field of trl.SFTConfig, plus the LLaVA stage, projector learning rate and "
        "modality-length grouping.",
    )
    lora = _derive("LoraSection", LoraConfig, _LORA_DEFAULTS, _LORA_MANAGED, (), "Fields of peft.LoraConfig.")
    quant = _derive(
        "QuantSection",
        BitsAndBytesConfig,
        _QUANT_DEFAULTS,
        _QUANT_MANAGED,
        _QUANT_OURS,
        "Quantization of the language model: bits, plus the fields of transformers.BitsAndBytesConfig.",
    )
    return train, lora, quant


TrainSection, LoraSection, QuantSection = _sections()

SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "quant": QuantSection,
    "lora": LoraSection,
    "data": DataSection,
    "train": TrainSection,
    "demo": DemoSection,
}
_OPTIONAL_SECTIONS = {"demo"}
_LIST_FIELDS = {("data", "train"), ("data", "eval")}


@dataclasses.dataclass
class Recipe:
    """A whole experiment. Build it with :func:`load_recipe` or :func:`recipe_from_dict`."""

    model: ModelSection
    quant: Any
    lora: Any
    data: DataSection
    train: Any
    demo: DemoSection | None = None
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
    hints = typing.get_type_hints(cls) if cls.__module__ == __name__ and not hasattr(cls, "upstream") else {}
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
        if (name, key) in _LIST_FIELDS and isinstance(value, str):
            value = [value]
        ok, conv = _type_ok(value, typ)
        if not ok:
            problems.append(f"{name}.{key}: got {value!r} ({type(value).__name__}); expected {_type_name(typ)}")
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
        if name in _OPTIONAL_SECTIONS and name not in raw:
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
    if r.data.max_length < 8:
        p.append(f"data.max_length: {r.data.max_length} is too small to hold a prompt and an answer")
    if r.lora.r <= 0:
        p.append(f"lora.r: must be positive, got {r.lora.r}")
    if r.train.projector_lr is not None and r.train.projector_lr < 0:
        p.append(f"train.projector_lr: must be >= 0, got {r.train.projector_lr}")
    if r.train.trainable_dtype == "bfloat16" and r.model.dtype not in ("bfloat16", "auto"):
        p.append(f"train.trainable_dtype: bfloat16 needs model.dtype bfloat16 (or auto on a bf16 GPU), got "
                 f"'{r.model.dtype}'")
    p += _report_to_problems(r.train.report_to)
    # Both choose the training sampler; transformers 5 spells its group_by_length as a train_sampling_strategy.
    if r.train.group_by_modality_length and r.train.train_sampling_strategy != "random":
        p.append(f"train.group_by_modality_length and train.train_sampling_strategy: both choose the training "
                 f"sampler; set group_by_modality_length: false or leave train_sampling_strategy at 'random' "
                 f"(got '{r.train.train_sampling_strategy}')")
    if r.demo is None and check_files:
        for key in ("train", "eval"):
            for path in getattr(r.data, key):
                if not Path(path).exists():
                    p.append(f"data.{key}: file '{path}' does not exist")
        if r.data.image_folder is not None and not Path(r.data.image_folder).is_dir():
            p.append(f"data.image_folder: '{r.data.image_folder}' is not a folder")
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
    if not path.is_file():
        raise RecipeError([f"file '{path}' does not exist"], source)
    try:
        raw = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError([f"not valid YAML{where}: {getattr(e, 'problem', e)}"], source) from None
    raw, problems = apply_overrides(raw if isinstance(raw, dict) else {}, overrides or [])
    try:
        recipe = recipe_from_dict(raw, source, check_files=check_files)
    except RecipeError as e:
        raise RecipeError(problems + e.problems, source) from None
    if problems:
        raise RecipeError(problems, source)
    return recipe


def section_keys(name: str) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, origin) for every key of a section: what ``validate --keys`` lists."""
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls) if not hasattr(cls, "upstream") else {}
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((f.name, _type_name(hints.get(f.name, f.type)), default, f.metadata.get("origin", "lora-llava")))
    return out
