"""What a recipe's model is, read once from config files (no weights): :class:`ModelSpec`.

The loader, the projector check of stage chaining, the planner and the merge all start from a ``ModelSpec``, so the
three ways to get a LLaVA-1.5 (a llava-hf checkpoint, an original LLaVA checkpoint, or a Vicuna + a CLIP tower) are
told apart in one place and each ``config.json`` is parsed once per command.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import DataError, ModelError
from ..files import read_json
from .anyres import AnyresGrid, grid_pinpoints
from .constants import DEFAULT_VISION_TOWER, image_tokens
from .layouts import checkpoint_layout, original_text_fields

__all__ = ["ModelSpec", "checkpoint_model_keys", "config_image_token_id", "config_image_tokens", "image_token_counts",
           "is_next_config", "llava_config", "looks_local", "read_config_dict", "resolve_pinpoints"]


def looks_local(path: str) -> bool:
    """Is ``path`` meant as a local path (absolute, relative with ./ or ~, existing, or not an ``owner/name`` Hub
    id)?"""
    p = Path(path)
    return p.is_absolute() or path.startswith((".", "~")) or p.exists() or path.count("/") != 1


def _check_checkpoint(path: str, key: str) -> None:
    p = Path(path)
    if looks_local(path) and not p.exists():
        raise ModelError(f"{key}: '{path}' does not exist")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelError(f"{key}: '{path}' has no config.json; is it a model checkpoint folder?")
    if p.exists() and not p.is_dir():
        raise ModelError(f"{key}: '{path}' is a file; give the checkpoint's folder")


_READ: dict[tuple[str, int], dict[str, Any]] = {}
"""config.json files already parsed in this process, by path and modification time: each is parsed once."""


def read_config_dict(path: str, key: str, known: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The raw ``config.json`` of a local folder or Hub id (no model class needed, so original LLaVA reads too).

    ``known``: config dicts of Hub ids to use instead of fetching them (the planner ships the published ones); with
    ``known`` nothing is fetched. A local file is parsed once per process (until it changes).
    """
    if known is not None and not Path(path).is_dir():
        if path in known:
            return copy.deepcopy(known[path])
        raise ModelError(f"{key}: the shapes of '{path}' are unknown offline; give a local checkpoint folder (one with "
                         f"config.json) or one of: {', '.join(sorted(known))}")
    _check_checkpoint(path, key)
    file = Path(path) / "config.json"
    if file.is_file():
        stamp = (str(file.resolve()), file.stat().st_mtime_ns)
        if stamp not in _READ:
            try:
                _READ[stamp] = read_json(file, dict, "a model config (a JSON object)")
            except DataError as e:
                raise ModelError(f"{key}: {e}") from None
        return copy.deepcopy(_READ[stamp])
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{key}: '{path}' is not a local folder and could not be loaded from the Hub ({e})") from None
    return config


def config_image_token_id(config) -> int:
    """The ``<image>`` id of a ``LlavaConfig`` (transformers 5 ``image_token_id``, older ``image_token_index``)."""
    value = getattr(config, "image_token_id", None)
    return value if value is not None else config.image_token_index


def config_image_tokens(config) -> int:
    """Image tokens per image of a ``LlavaConfig``."""
    vc = config.vision_config
    return image_tokens(vc.image_size, vc.patch_size, config.vision_feature_select_strategy)


def is_next_config(config) -> bool:
    """Is this model config (object or dict) a LLaVA-NeXT one (grid resolutions: AnyRes images)?"""
    return AnyresGrid.from_config(config) is not None


def image_token_counts(config, sizes: Sequence[tuple[int, int]]) -> int | list[int]:
    """Image tokens of images of ``sizes`` (``(height, width)`` as the image processor gets them) for the model
    ``config``: one count for all (LLaVA-1.5) or one per image (LLaVA-NeXT, where it depends on the size);
    what :func:`~lora_llava.data.encode_prompt` takes."""
    grid = AnyresGrid.from_config(config)
    if grid is None:
        return config_image_tokens(config)
    return [grid.tokens(int(h), int(w)) for h, w in sizes]


def resolve_pinpoints(value, tile: int, key: str = "model.image_grid_pinpoints") -> tuple[tuple[int, int], ...]:
    """``model.image_grid_pinpoints`` for a tower of ``tile`` px: ``default`` = 1x2, 2x1 and 2x2 tiles; every
    resolution must be a whole number of tiles (the image processor cuts the grid into tower-sized tiles)."""
    pins = grid_pinpoints(tile) if value == "default" else [[int(h), int(w)] for h, w in value]
    bad = [p for p in pins if p[0] % tile or p[1] % tile or min(p) <= 0]
    if bad:
        raise ModelError(f"{key}: {bad} are not whole grids of the vision tower's {tile} px tiles; give [height, "
                         f"width] pairs that are multiples of {tile} (or 'default')")
    return tuple((h, w) for h, w in pins)


def llava_config(text_config, vision_config, image_token_id: int, feature_layer: int = -2, strategy: str = "default",
                 pinpoints: Sequence[Sequence[int]] | None = None, projector_type: str = "mlp2x_gelu", **extra: Any):
    """LLaVA-1.5's ``LlavaConfig``: GELU projector with biases, features of ``feature_layer``, image tokens from the
    tower's patch grid (plus CLS with the ``full`` strategy). With grid ``pinpoints`` the same model as a
    ``LlavaNextConfig`` (LLaVA-1.5-HD / NeXT AnyRes: images cut into those grids of tiles). ``projector_type: linear``
    (LLaVA v1): the activation is the identity (transformers' ``"linear"``), so ``linear_2`` held at the identity
    makes the projector exactly v1's single linear layer."""
    from transformers import LlavaConfig, LlavaNextConfig

    vc = vision_config if isinstance(vision_config, dict) else vision_config.to_dict()
    if pinpoints:
        extra["image_grid_pinpoints"] = [list(p) for p in pinpoints]
    return (LlavaNextConfig if pinpoints else LlavaConfig)(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
        projector_hidden_act="linear" if projector_type == "linear" else "gelu", vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=image_tokens(vc["image_size"], vc["patch_size"], strategy), multimodal_projector_bias=True,
        **extra,
    )


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A recipe's model as its config files describe it.

    ``layout``: ``llava-hf`` (loaded as is), ``llava-original`` (converted on load) or ``parts`` (``model.llm`` +
    ``model.vision_tower``, fresh projector). ``text`` holds the language model's config fields, ``vision_config``
    the CLIP vision config; ``vision_path`` is the CLIP checkpoint the tower is loaded from (None for llava-hf, which
    carries its own).
    """

    layout: str
    key: str
    path: str
    config: dict[str, Any]
    text: dict[str, Any]
    vision_config: Any
    vision_path: str | None
    vision_key: str
    feature_layer: Any = -2
    strategy: str = "default"
    pinpoints: tuple[tuple[int, int], ...] | None = None
    """Grid resolutions (``[height, width]``) of a LLaVA-NeXT / 1.5-HD model; None for LLaVA-1.5."""
    projector_type: str = "mlp2x_gelu"
    """``mlp2x_gelu`` (LLaVA-1.5) or ``linear`` (LLaVA v1: ``linear_1``, identity activation, frozen identity
    ``linear_2``)."""
    start_end: bool = False
    """LLaVA v1's ``<im_start>`` / ``<im_end>`` around each image's tokens."""

    @classmethod
    def from_recipe(cls, recipe, base: str | None = None,
                    known: Mapping[str, dict[str, Any]] | None = None) -> ModelSpec:
        """The spec of ``recipe.model``; ``base`` replaces its checkpoint path (``merge --base``), ``known`` gives
        config dicts of Hub ids (see :func:`read_config_dict`). Raises :class:`ModelError` naming the recipe key
        for a checkpoint of a kind lora-llava cannot train."""
        m = recipe.model
        if m.llava is not None:
            key = "--base" if base else "model.llava"
            path = base or m.llava
            config = read_config_dict(path, key, known)
            layout = checkpoint_layout(config)
            if layout == "llava-hf":
                return cls._llava_hf(m, key, path, config)
            if layout == "llava-original":
                return cls._original(m, key, path, config, known)
            raise ModelError(f"{key}: '{path}' is a '{config.get('model_type', '?')}' checkpoint, not a LLaVA "
                             "(llava-hf or original layout); to assemble from a language model set model.llm instead")
        key = "--base" if base else "model.llm"
        path = base or m.llm
        config = read_config_dict(path, key, known)
        layout = checkpoint_layout(config)
        if layout != "llama":
            hint = "; set it as model.llava" if layout.startswith("llava") else ""
            raise ModelError(f"{key}: '{path}' is a '{config.get('model_type', '?')}' checkpoint, not a Llama / "
                             f"Vicuna language model{hint}")
        tower = m.vision_tower or DEFAULT_VISION_TOWER
        vision = _vision(tower, "model.vision_tower", known)
        pins = None if m.image_grid_pinpoints is None else resolve_pinpoints(m.image_grid_pinpoints,
                                                                               vision.image_size)
        return cls("parts", key, path, config, dict(config), vision, tower, "model.vision_tower", pinpoints=pins,
                   projector_type=_recipe_value(m, "projector_type", "mlp2x_gelu"),
                   start_end=_recipe_value(m, "image_tokens", "plain") == "start_end")

    @classmethod
    def _llava_hf(cls, m, key: str, path: str, config: dict[str, Any]) -> ModelSpec:
        from transformers import LlavaConfig, LlavaNextConfig

        if m.vision_tower is not None:
            raise ModelError(f"model.vision_tower: '{path}' is a llava-hf checkpoint that brings its own vision "
                             "tower; remove model.vision_tower")
        if config.get("model_type") == "llava_next":
            c = LlavaNextConfig.from_dict(config)
            pins = resolve_pinpoints(m.image_grid_pinpoints or c.image_grid_pinpoints, c.vision_config.image_size,
                                     "model.image_grid_pinpoints" if m.image_grid_pinpoints else
                                     f"image_grid_pinpoints of '{path}'")
            if pins != tuple(tuple(p) for p in c.image_grid_pinpoints):
                config = {**config, "image_grid_pinpoints": [list(p) for p in pins]}
        else:
            if m.image_grid_pinpoints is not None:
                raise ModelError(f"model.image_grid_pinpoints: '{path}' is a llava-hf LLaVA-1.5 checkpoint, loaded as "
                                 "it is; for LLaVA-1.5-HD start from its parts (model.llm + model.vision_tower, "
                                 "model.projector for a stage-1 projector) or from the original-layout checkpoint")
            c, pins = LlavaConfig.from_dict(config), None
        kind = "linear" if c.projector_hidden_act == "linear" else "mlp2x_gelu"
        _agree(m, "projector_type", kind, path, f"projector_hidden_act '{c.projector_hidden_act}'")
        # Start/end tokens live in the tokenizer (the loader checks it against model.image_tokens).
        return cls("llava-hf", key, path, config, c.text_config.to_dict(), c.vision_config, None, key,
                   c.vision_feature_layer, c.vision_feature_select_strategy, pins, projector_type=kind,
                   start_end=_recipe_value(m, "image_tokens", "plain") == "start_end")

    @classmethod
    def _original(cls, m, key: str, path: str, config: dict[str, Any], known) -> ModelSpec:
        if config.get("model_type") not in ("llava_llama", "llava", None):
            raise ModelError(f"{key}: '{path}' is an original LLaVA checkpoint of type '{config['model_type']}'; "
                             "only the Llama/Vicuna based LLaVA-1.5 (llava_llama) is supported")
        # The original v1 releases predate mm_projector_type: absent means v1's single linear layer.
        kind = config.get("mm_projector_type", "linear")
        if kind not in ("mlp2x_gelu", "linear"):
            raise ModelError(f"{key}: '{path}' has mm_projector_type '{kind}'; lora-llava reads mlp2x_gelu "
                             "(LLaVA-1.5) and linear (LLaVA v1)")
        _agree(m, "projector_type", kind, path, f"mm_projector_type '{kind}'")
        start_end = bool(config.get("mm_use_im_start_end"))
        _agree(m, "image_tokens", "start_end" if start_end else "plain", path,
               f"mm_use_im_start_end {str(start_end).lower()}")
        select = config.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise ModelError(f"{key}: '{path}' has mm_vision_select_feature '{select}' (expected patch)")
        tower = m.vision_tower or config.get("mm_vision_tower") or DEFAULT_VISION_TOWER
        if not m.vision_tower and tower.startswith("./") and Path(path).is_dir():
            # An export's own tower folder ("./vision_tower"): relative to the checkpoint, so it moves with it. (The
            # reference code opens it relative to the current directory instead.)
            tower = str(Path(path) / tower)
        vision_key = "model.vision_tower" if m.vision_tower else f"mm_vision_tower of '{path}'"
        vision = _vision(tower, vision_key, known)
        text = original_text_fields(config)
        if isinstance(text.get("pad_token_id"), int) and text["pad_token_id"] < 0:
            # The v1 releases say pad_token_id -1, which nn.Embedding reads as its last row (<im_end> there): a
            # padding_idx that would zero that row's gradient. The loader sets <pad>'s id instead.
            text["pad_token_id"] = None
        return cls("llava-original", key, path, config, text, vision, tower, vision_key,
                   config.get("mm_vision_select_layer", -2), "default" if select == "patch" else "full",
                   _original_pinpoints(m, key, path, config, vision.image_size), projector_type=kind,
                   start_end=start_end)

    @property
    def is_next(self) -> bool:
        """A LLaVA-NeXT (AnyRes) model: transformers' ``LlavaNextForConditionalGeneration``."""
        return self.pinpoints is not None

    @property
    def tower_in_checkpoint(self) -> bool:
        """Does the checkpoint bring its own (fine-tuned) vision tower weights? LLaVA-1.6 in the original layout
        trained its tower (``unfreeze_mm_vision_tower``) and ships it; ``mm_vision_tower`` (or ``model.vision_tower``)
        then only gives the tower's config. (A llava-hf checkpoint always brings its tower.)"""
        return self.layout == "llava-original" and bool(self.config.get("unfreeze_mm_vision_tower"))

    @property
    def grid(self) -> AnyresGrid | None:
        """How this model cuts images (None for LLaVA-1.5)."""
        if self.pinpoints is None:
            return None
        vc = self.vision_config
        return AnyresGrid(vc.image_size, vc.patch_size, self.pinpoints, self.strategy)

    @property
    def image_tokens(self) -> int:
        """Image tokens per image of LLaVA-1.5 (576 for CLIP ViT-L/14-336); a NeXT model's base view (its images
        take more: see :attr:`grid`)."""
        vc = self.vision_config
        return image_tokens(vc.image_size, vc.patch_size, self.strategy)

    @property
    def text_hidden(self) -> int:
        return self.text.get("hidden_size", 4096)

    def text_config(self):
        """The language model's transformers config (a ``LlamaConfig``)."""
        from transformers import LlamaConfig

        drop = ("model_type", "transformers_version")
        return LlamaConfig(**{k: v for k, v in self.text.items() if k not in drop})

    def projector_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the projector this model has: ``linear_1`` takes the tower's features (of every selected
        layer), ``linear_2`` maps the LLM's hidden size onto itself."""
        text = self.text_hidden
        vision = self.vision_config.hidden_size * len(_as_list(self.feature_layer))
        if self.layout == "llava-original":
            vision = self.config.get("mm_hidden_size") or vision
        shapes = {"linear_1.weight": (text, vision), "linear_1.bias": (text,),
                  "linear_2.weight": (text, text), "linear_2.bias": (text,)}
        if self.is_next:
            shapes["image_newline"] = (text,)
        return shapes


def _original_pinpoints(m, key: str, path: str, config: dict[str, Any], tile: int):
    """Grid resolutions of an original-layout checkpoint: the recipe's (LLaVA-1.5-HD from a 1.5 checkpoint), or a
    LLaVA-1.6 config's (``image_aspect_ratio: anyres``, ``mm_patch_merge_type: spatial_unpad``)."""
    anyres = str(config.get("image_aspect_ratio", "pad")).startswith("anyres")
    merge = config.get("mm_patch_merge_type", "flat")
    if anyres and merge != "spatial_unpad":
        raise ModelError(f"{key}: '{path}' has image_aspect_ratio '{config['image_aspect_ratio']}' with "
                         f"mm_patch_merge_type '{merge}'; only LLaVA-1.6's spatial_unpad (what transformers' "
                         "LlavaNext implements) is supported")
    if anyres and config.get("image_aspect_ratio") != "anyres":
        raise ModelError(f"{key}: '{path}' has image_aspect_ratio '{config['image_aspect_ratio']}'; of the AnyRes "
                         "variants only LLaVA-1.6's plain 'anyres' is supported")
    if m.image_grid_pinpoints is not None:
        return resolve_pinpoints(m.image_grid_pinpoints, tile)
    if anyres:
        pins = config.get("image_grid_pinpoints")
        if not pins:
            raise ModelError(f"{key}: '{path}' has image_aspect_ratio anyres but no image_grid_pinpoints")
        return resolve_pinpoints(pins, tile, f"image_grid_pinpoints of '{path}'")
    return None


def checkpoint_model_keys(path: str, config: dict[str, Any]) -> dict[str, str]:
    """``model.projector_type`` / ``model.image_tokens`` as a local LLaVA checkpoint has them (for loading one to
    answer with, where there is no recipe to say): LLaVA v1's linear projector and start/end tokens, or LLaVA-1.5's."""
    layout = checkpoint_layout(config)
    if layout == "llava-original":
        kind = config.get("mm_projector_type", "linear")
        start_end = bool(config.get("mm_use_im_start_end"))
    elif layout == "llava-hf":
        kind = "linear" if config.get("projector_hidden_act") == "linear" else "mlp2x_gelu"
        folder = Path(path)
        start_end = any(f.is_file() and '"<im_start>"' in f.read_text(encoding="utf-8", errors="replace")
                        for f in (folder / "added_tokens.json", folder / "tokenizer_config.json"))
    else:
        return {}
    keys = {"image_tokens": "start_end" if start_end else "plain"}
    if kind in ("linear", "mlp2x_gelu"):
        keys["projector_type"] = kind
    return keys


def _recipe_value(m, name: str, default: str) -> str:
    """``model.<name>`` of a recipe (the default for a model section from before the key existed)."""
    return getattr(m, name, default) or default


def _agree(m, name: str, found: str, path: str, what: str) -> None:
    """A LLaVA checkpoint's projector / image tokens are what they are: the recipe must say the same."""
    wanted = _recipe_value(m, name, found)
    if wanted != found:
        raise ModelError(f"model.{name}: '{wanted}', but '{path}' has {what}; set model.{name}: {found}")


def _vision(path: str, key: str, known) -> Any:
    """The CLIP vision config of a CLIP checkpoint (a full CLIPModel or a vision-only one), checked to be CLIP."""
    from transformers import CLIPVisionConfig

    raw = read_config_dict(path, key, known)
    if checkpoint_layout(raw) != "clip":
        raise ModelError(f"{key}: '{path}' is a '{raw.get('model_type', '?')}' checkpoint, not a CLIP vision model")
    if raw.get("model_type") == "clip":
        raw = raw.get("vision_config") or {}
    return CLIPVisionConfig(**{k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")})
