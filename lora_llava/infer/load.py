"""Load a model to answer with: a trained run folder (base + projector + adapter, as trained, 4-bit included), a
llava-hf checkpoint (e.g. a ``lora-llava merge`` export) or an original LLaVA checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..data import get_template
from ..errors import DataError, InferenceError, ModelError, RecipeError
from ..files import read_json, read_tensors
from ..llava.layouts import EXPORT_INFO_FILE, checkpoint_layout
from ..llava.spec import checkpoint_model_keys, read_config_dict
from ..run.folder import CheckpointFolder, RunFolder

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_for_inference"]

DEFAULT_TEMPLATE = "vicuna_v1"
_ASPECTS = ("pad", "resize", "anyres")


class LoadedModel(tuple):
    """What :func:`load_for_inference` returns: a ``(model, processor, template)`` tuple.

    It also says how images were prepared in training (``image_aspect_ratio``), what was loaded (``kind``: ``run``,
    ``llava-hf`` or ``llava-original``) and from where (``path``).
    """

    def __new__(cls, model, processor, template: str, *, image_aspect_ratio: str = "pad", kind: str = "",
                path: Path | None = None):
        self = super().__new__(cls, (model, processor, template))
        self.image_aspect_ratio = image_aspect_ratio
        self.kind = kind
        self.path = path
        return self

    @property
    def model(self):
        return self[0]

    @property
    def processor(self):
        return self[1]

    @property
    def template(self) -> str:
        return self[2]

    def __repr__(self) -> str:
        return f"LoadedModel({self.kind} '{self.path}', template {self.template}, images {self.image_aspect_ratio})"


def load_for_inference(path: str | Path, device: str | torch.device | None = None, *, bits: int | None = None,
                       dtype: str | None = None) -> LoadedModel:
    """Load a model to answer with; returns :class:`LoadedModel`, which unpacks as ``(model, processor, template)``.

    ``path`` is one of

    * a lora-llava run folder (``recipe.yaml``): the base model is rebuilt as training built it (the recipe's
      ``model`` and ``quant`` sections, 4-bit included), the trained ``projector.safetensors`` is put in, the LoRA
      ``adapter/`` attached for a stage-2 run; the run's ``processor/`` and the recipe's template are used;
    * a training checkpoint of a run folder (``RUN/checkpoint-N``): the same, with the checkpoint's adapter and
      projector;
    * a llava-hf checkpoint folder (``config.json`` with ``model_type: llava`` or ``llava_next``), e.g. a
      ``lora-llava merge`` export;
    * an original LLaVA checkpoint folder (``model_type: llava_llama``), converted on load.

    A checkpoint's template is ``vicuna_v1`` unless a ``lora_llava.json`` next to it names another.
    ``bits`` (4, 8, 16) replaces the quantization (default: as trained for a run, 16 for a checkpoint); ``dtype``
    (``auto``, ``bfloat16``, ``float16``, ``float32``) the compute dtype; ``device`` where the model runs (default:
    the GPU when there is one, else the CPU).
    """
    root = Path(path)
    if not root.exists():
        raise InferenceError(f"'{path}' does not exist")
    if not root.is_dir():
        raise InferenceError(f"'{path}' is not a folder; give a lora-llava run folder (with recipe.yaml) or a LLaVA "
                             "checkpoint folder (with config.json)")
    if bits is not None and bits not in (4, 8, 16):
        raise InferenceError(f"bits: got {bits}; expected 4, 8 or 16")
    if dtype is not None and dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise InferenceError(f"dtype: got '{dtype}'; expected auto, bfloat16, float16 or float32")
    dev = _target_device(device)
    if RunFolder.open(root).is_run():
        loaded = _load_run(root, bits, dtype, dev)
    elif (root / "config.json").is_file():
        loaded = _load_checkpoint(root, bits, dtype, dev)
    else:
        raise InferenceError(f"'{path}' has neither {RunFolder(root).recipe_file.name} (a lora-llava run folder) nor "
                             "config.json (a LLaVA checkpoint folder)")
    loaded.model.eval()
    loaded.model.requires_grad_(False)
    logger.info("loaded %s '%s' (template %s) on %s", loaded.kind, root, loaded.template,
                next(loaded.model.parameters()).device)
    return loaded


def _target_device(device) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InferenceError(f"device: '{device}' is not a device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InferenceError(f"device: '{device}' asked but there is no CUDA GPU")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _device_map(dev: torch.device | None) -> dict[str, Any] | None:
    """Where the weights are loaded: the device asked for (a quantized model runs where it is loaded)."""
    if dev is None:
        return None
    return {"": dev.index if dev.type == "cuda" else str(dev)}


def _load_run(root: Path, bits: int | None, dtype: str | None, dev: torch.device | None) -> LoadedModel:
    from peft import PeftModel
    from transformers import AutoProcessor

    from ..model.loading import load_model
    from ..model.projector import load_projector, read_projector

    run = RunFolder.open(root)  # a training checkpoint (RUN/checkpoint-N): the run's recipe, its own weights
    checkpoint = isinstance(run, CheckpointFolder)
    where = f"checkpoint '{root}'" if checkpoint else f"run folder '{root}'"
    if not run.is_finished():
        raise InferenceError(f"{where}: {run.unfinished_hint()}")
    overrides = ([f"quant.bits={bits}"] if bits is not None else []) + ([f"model.dtype={dtype}"] if dtype else [])
    try:
        recipe = run.read_recipe(overrides)
    except RecipeError as e:
        raise InferenceError(f"{where}: {e}") from None
    adapter = run.adapter_dir
    if recipe.train.stage == 2 and not RunFolder.adapter_files(adapter)[1].is_file():
        raise InferenceError(f"{where}: a stage-2 run (train.stage: 2 in {run.recipe_file.name}) but there is no LoRA "
                             f"adapter '{adapter}' (adapter_config.json); the run did not finish, or the adapter was "
                             "moved")
    projector = run.projector_file
    if not projector.is_file():
        raise InferenceError(f"{where}: no trained projector '{projector}'; the run did not finish")
    try:
        model, processor = load_model(recipe, device_map=_device_map(dev))
        load_projector(model, read_projector(projector), projector)
    except ModelError as e:
        raise InferenceError(f"{where}: {e}{_relative_paths_hint(recipe)}") from None
    if recipe.train.stage == 2:
        weights = RunFolder.adapter_files(adapter)[0]
        try:
            read_tensors(weights)  # small; a damaged file is named as such, not as "does not fit"
        except DataError as e:
            raise InferenceError(f"{where}: the adapter cannot be read: {e}") from None
        try:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise InferenceError(f"{where}: the adapter '{adapter}' does not fit the base model "
                                 f"({str(e).splitlines()[0][:300]})") from None
    if run.processor_dir.is_dir():
        processor = AutoProcessor.from_pretrained(str(run.processor_dir))
    else:
        logger.warning("%s has no processor/; using the base model's tokenizer and image processor", where)
    return LoadedModel(model, processor, recipe.template, image_aspect_ratio=recipe.data.image_aspect_ratio,
                       kind="run checkpoint" if checkpoint else "run", path=root)


def _relative_paths_hint(recipe) -> str:
    """A recipe keeps the model paths as given to training: relative ones are relative to where it ran."""
    m = recipe.model
    relative = [p for p in (m.llava, m.llm, m.vision_tower) if p and not Path(p).is_absolute() and not Path(p).exists()]
    if not relative:
        return ""
    return (f" (if '{relative[0]}' is a local folder: paths in a run's recipe.yaml are relative to the folder training "
            "ran in; run from there)")


def _json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold an object; errors name the file."""
    try:
        return read_json(path, dict, what)
    except DataError as e:
        raise InferenceError(str(e)) from None


def _export_info(root: Path) -> dict[str, Any]:
    """``lora_llava.json`` of a checkpoint folder (``{}`` when there is none), checked."""
    path = root / EXPORT_INFO_FILE
    if not path.is_file():
        return {}
    info = _json_object(path, "a JSON object such as {\"template\": \"vicuna_v1\"}")
    if "template" in info:
        try:
            get_template(info["template"])
        except (ValueError, TypeError) as e:
            raise InferenceError(f"'{path}': template: {e}") from None
    if info.get("image_aspect_ratio", "pad") not in _ASPECTS:
        raise InferenceError(f"'{path}': image_aspect_ratio: got {info['image_aspect_ratio']!r}; expected one of "
                             f"{', '.join(_ASPECTS)}")
    return info


def _load_checkpoint(root: Path, bits: int | None, dtype: str | None, dev: torch.device | None) -> LoadedModel:
    from ..config.recipe import recipe_from_dict
    from ..model.loading import load_model

    try:
        config = read_config_dict(str(root), "model.llava")  # parsed once: the loader reads the same dict
    except ModelError as e:
        raise InferenceError(str(e).removeprefix("model.llava: ")) from None
    layout = checkpoint_layout(config)
    if layout not in ("llava-hf", "llava-original"):
        raise InferenceError(f"'{root}' holds a '{config.get('model_type', '?')}' checkpoint, not a LLaVA model "
                             f"(llava-hf or original layout) or a lora-llava run folder (recipe.yaml)")
    info = _export_info(root)
    raw: dict[str, Any] = {"model": {"llava": str(root), **checkpoint_model_keys(str(root), config)},
                           "quant": {"bits": 16 if bits is None else bits}}
    if dtype:
        raw["model"]["dtype"] = dtype
    try:
        recipe = recipe_from_dict(raw, source=str(root), check_files=False)
        model, processor = load_model(recipe, device_map=_device_map(dev))
    except RecipeError as e:
        raise InferenceError(str(e)) from None
    except ModelError as e:
        raise InferenceError(str(e).removeprefix("model.llava: ")) from None
    aspect = info.get("image_aspect_ratio")
    if aspect is None:
        # Original LLaVA configs say how their images were prepared; LLaVA-1.5 pads to a square.
        aspect = "pad" if layout == "llava-hf" or config.get("image_aspect_ratio", "pad") == "pad" else "resize"
    return LoadedModel(model, processor, info.get("template", DEFAULT_TEMPLATE), image_aspect_ratio=aspect,
                       kind=layout, path=root)
