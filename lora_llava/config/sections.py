"""The keys of every recipe section: the hand-written LLaVA sections, and the ``train`` / ``lora`` / ``quant``
sections derived from ``trl.SFTConfig``, ``peft.LoraConfig`` and ``transformers.BitsAndBytesConfig`` (every upstream
field with its upstream type, LLaVA-1.5 defaults, and the fields lora-llava sets itself refused).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from ..llava.constants import LORA_TARGETS
from .types import type_name, type_ok

__all__ = ["LIST_FIELDS", "OPTIONAL_SECTIONS", "SECTIONS", "DataSection", "DemoSection", "EvalSection", "LoraSection",
           "ModelSection", "QuantSection", "TrainSection", "schema_cache_file", "section_keys", "upstream_fields"]

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
    or the reference's ``mm_projector.bin``. A LLaVA-NeXT run's projector carries its ``image_newline`` too."""
    image_grid_pinpoints: list[list[int]] | Literal["default"] | None = None
    """High resolution (LLaVA-1.5-HD / LLaVA-NeXT "AnyRes"): the grid resolutions an image is cut into, as
    ``[height, width]`` pairs in pixels, each a multiple of the vision tower's tile size (336 for CLIP-336);
    ``default`` = grids of 1x2, 2x1 and 2x2 tiles (``[[336, 672], [672, 336], [672, 672]]`` at 336 px). The model is
    then transformers' ``LlavaNextForConditionalGeneration``. Unset: LLaVA-1.5 (one tile per image), or the
    resolutions a LLaVA-NeXT checkpoint (``model.llava``) names."""
    projector_type: Literal["mlp2x_gelu", "linear"] = "mlp2x_gelu"
    """``mlp2x_gelu`` = LLaVA-1.5's Linear-GELU-Linear; ``linear`` = the original LLaVA's (v1) single linear layer,
    held as ``linear_1`` with an identity activation and a frozen identity ``linear_2``, so exports stay a plain
    transformers LLaVA. A LLaVA checkpoint's own projector must agree."""
    image_tokens: Literal["plain", "start_end"] = "plain"
    """``plain`` = each image is its image tokens (LLaVA-1.5); ``start_end`` = wrapped in ``<im_start>`` /
    ``<im_end>``, added tokens whose input embedding rows train in both stages (the original LLaVA, v1)."""
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
    """Longest sample in tokens, image tokens included (576 per image for LLaVA-1.5; an AnyRes model's depend on each
    image's size, up to 2,928 with the default grid: such samples are dropped as too long, never cut)."""
    max_tiles: int | None = None
    """AnyRes models only: at most this many tiles per image (the base view not counted). Training writes the grid
    resolutions with at most this many tiles into the run's recipe as ``model.image_grid_pinpoints``, so the model,
    its processor and every merge or inference of the run use the capped grid; caps image tokens, vision-tower work
    and memory. Unset = the model's grid as it is."""
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
    anyres: bool = False
    """A tiny LLaVA-NeXT (grid of ``image_size`` tiles) and images of 1 to 2 tiles a side (``recipes/demo_hd.yaml``)."""


@dataclasses.dataclass
class EvalSection:
    """Evaluate after training: ``lora-llava eval run`` on the trained model, written to ``RUN/eval/<benchmark>/``."""

    benchmark: Literal["vqav2", "textvqa", "gqa", "scienceqa", "pope", "mme", "custom"] = "custom"
    """The benchmark (the judge-scored ones need an endpoint: run ``lora-llava eval run`` for them)."""
    questions: str | None = None
    """The benchmark's question file; ``custom``: a held-out LLaVA JSON, by default ``data.eval``'s first file."""
    annotations: str | None = None
    """Ground truth to score against (see README per benchmark); ``custom`` scores against its questions file."""
    image_folder: str | None = None
    """Folder the questions' images are under; unset = ``data.image_folder``."""
    limit: int | None = None
    """Answer only the first N questions."""
    batch_size: int = 8
    max_new_tokens: int = 128
    """Longest answer in tokens (LLaVA's eval: 128)."""


# --------------------------------------------------------------------------------------------------------------------
# Derived sections: fields come from the upstream class, with LLaVA defaults and a few fields of our own.

_TRAIN_OURS: list[tuple[str, Any, Any, str]] = [
    ("stage", Literal[1, 2], 2, "1 = align the projector (projector only); 2 = LoRA + projector"),
    ("projector_lr", float | None, 2e-5, "learning rate of the projector (and of LLaVA v1's <im_start>/<im_end> "
     "rows) in stage 2 (LLaVA-1.5: 2e-5)"),
    ("group_by_modality_length", bool, False,
     "batches of one modality (image or text-only) and of similar length, as LLaVA-1.5's fine-tuning does: less "
     "padding, and text-only batches skip the vision tower"),
    ("trainable_dtype", Literal["float32", "bfloat16"], "float32",
     "dtype of the trainable weights (LoRA, projector) and so of their optimizer state: float32 = fp32 master "
     "weights (the default), bfloat16 = half the memory of those weights and their gradients (needs model.dtype "
     "bfloat16)"),
]
# Defaults from LLaVA-1.5's reference hyperparameters; everything else is SFTConfig's.
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
    "target_modules": list(LORA_TARGETS),
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


# --------------------------------------------------------------------------------------------------------------------
# The upstream fields: read from the classes, or from a cache of what they were for these package versions.
#
# Importing trl.SFTConfig or peft.LoraConfig takes seconds (they pull in peft, bitsandbytes and torch's inductor), and
# `validate`, `plan`, `report` and `data check` load no model. So the fields -- name, annotation, default -- are read
# from the classes once per set of installed versions and kept as JSON in $LORA_LLAVA_CACHE/schema/; later commands
# read that file and never import the trainer. Annotations are stored in a small grammar (unions, literals, lists,
# enums by value, other classes by name); an annotation that does not fit it is kept as "any", left to the upstream
# class to check.

_UPSTREAM = {"train": ("trl", "SFTConfig"), "lora": ("peft", "LoraConfig"), "quant": ("transformers",
                                                                                       "BitsAndBytesConfig")}
_SCHEMA_FORMAT = 1
_SCALARS = {"any": Any, "none": type(None), "bool": bool, "int": int, "float": float, "str": str, "dict": dict,
            "mapping": dict[str, Any]}


def _encode_type(typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if typ is Any or typ is typing.Any:
        return "any"
    if origin is Literal:
        args = typing.get_args(typ)
        return {"literal": list(args)} if all(isinstance(a, (str, int, float, bool, type(None))) for a in args) \
            else "any"
    if origin in (typing.Union, types.UnionType):
        return {"union": [_encode_type(a) for a in typing.get_args(typ)]}
    if origin in (list, tuple, set):
        args = typing.get_args(typ)
        return {"list": _encode_type(args[0]) if args else "any"}
    if origin is dict:
        return "mapping"
    for name, scalar in _SCALARS.items():
        if typ is scalar:
            return name
    if isinstance(typ, type) and issubclass(typ, enum.Enum):
        values = [m.value for m in typ]
        if all(isinstance(v, (str, int)) for v in values):
            return {"enum": typ.__name__, "values": values}
    if isinstance(typ, type):
        return {"class": typ.__name__}  # a config object: no YAML value is one (the union's dict part takes YAML)
    return "any"


def _decode_type(spec: Any) -> Any:
    if isinstance(spec, str):
        return _SCALARS[spec]
    if "literal" in spec:
        return Literal[tuple(spec["literal"])]
    if "union" in spec:
        return typing.Union[tuple(_decode_type(a) for a in spec["union"])]  # noqa: UP007 - built from a list
    if "list" in spec:
        return list[_decode_type(spec["list"])]
    if "class" in spec:
        return type(spec["class"], (), {})
    return enum.Enum(spec["enum"], {f"m{i}": v for i, v in enumerate(spec["values"])})


def _plain_default(value: Any) -> Any:
    """A default as JSON holds it (enums by value); raises TypeError for one JSON cannot hold."""
    if isinstance(value, enum.Enum):
        value = value.value
    json.dumps(value)
    return value


def _fields_of(cls: type) -> list[tuple[str, Any, Any]]:
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


def _read_upstream() -> dict[str, list]:
    """{section: [[name, encoded type, default], ...]} read from the upstream classes (slow: imports them)."""
    import importlib

    out = {}
    for section, (module, name) in _UPSTREAM.items():
        cls = getattr(importlib.import_module(module), name)
        rows = []
        for fname, typ, default in _fields_of(cls):
            try:
                default = _plain_default(default)
            except TypeError:
                continue  # a default JSON cannot hold (none today): the field is left to the upstream class
            rows.append([fname, _encode_type(typ), default])
        out[section] = rows
    return out


def schema_cache_file() -> Path:
    """Where the upstream fields of the installed trl / peft / transformers versions are kept."""
    from importlib.metadata import version

    from ..files import cache_root

    key = "-".join(f"{m}{version(m)}" for m in ("trl", "peft", "transformers"))
    return cache_root() / "schema" / f"v{_SCHEMA_FORMAT}-py{sys.version_info[0]}.{sys.version_info[1]}-{key}.json"


def upstream_fields() -> dict[str, list]:
    """The upstream fields, from the cache when it holds these versions' (else read and cached, best effort)."""
    try:
        path = schema_cache_file()
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    fields = _read_upstream()
    with contextlib.suppress(OSError):
        from ..files import write_text_atomic

        write_text_atomic(path, json.dumps(fields))
    return fields


def _derive(
    name: str,
    section: str,
    upstream: list,
    defaults: dict[str, Any],
    managed: dict[str, str],
    ours: list[tuple[str, Any, Any, str]] = (),
    doc: str = "",
) -> type:
    origin = ".".join(_UPSTREAM[section])
    fields = []
    for fname, typ, default, help_ in ours:
        fields.append((fname, typ, _field(default, help_, "lora-llava")))
    upstream_defaults = {}
    for fname, spec, default in upstream:
        upstream_defaults[fname] = default
        if fname in managed:
            continue
        typ = _decode_type(spec)
        if fname in defaults:
            default = defaults[fname]
            # Our default may be outside the upstream annotation (compute dtype "auto"): widen the type.
            if not type_ok(default, typ)[0]:
                typ = typ | type(default)
        fields.append((fname, typ, _field(default, "", origin)))
    cls = dataclasses.make_dataclass(name, fields, namespace={"__doc__": doc, "__module__": __name__})
    cls.derived_from = origin
    cls.managed = managed
    cls.upstream_defaults = upstream_defaults
    cls.recipe_defaults = dict(defaults)
    return cls


def _field(default: Any, help_: str, origin: str) -> dataclasses.Field:
    meta = {"help": help_, "origin": origin}
    if isinstance(default, (list, dict, set)) or type(default).__hash__ is None:
        return dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _sections() -> tuple[type, type, type]:
    upstream = upstream_fields()
    train = _derive(
        "TrainSection",
        "train",
        upstream["train"],
        _TRAIN_DEFAULTS,
        _TRAIN_MANAGED,
        _TRAIN_OURS,
        "Training loop settings: every field of trl.SFTConfig, plus the LLaVA stage, projector learning rate and "
        "modality-length grouping.",
    )
    lora = _derive("LoraSection", "lora", upstream["lora"], _LORA_DEFAULTS, _LORA_MANAGED, (),
                   "Fields of peft.LoraConfig.")
    quant = _derive(
        "QuantSection",
        "quant",
        upstream["quant"],
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
    "eval": EvalSection,
}
OPTIONAL_SECTIONS = {"demo", "eval"}
LIST_FIELDS = {("data", "train"), ("data", "eval")}


def section_keys(name: str) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, origin) for every key of a section: what ``validate --keys`` lists."""
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls) if not hasattr(cls, "derived_from") else {}
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((f.name, type_name(hints.get(f.name, f.type)), default, f.metadata.get("origin", "lora-llava")))
    return out
