"""``lora-llava merge``: a run folder -> a model that plain transformers (llava-hf layout) or the reference code
(original LLaVA layout) loads, with none of lora-llava's code.

The LoRA adapter is merged into the *unquantized* base weights (or, with ``from_dequantized``, into exactly the NF4
weights training saw), the trained projector is put in, and the vision tower is copied. The base is streamed tensor by
tensor from its safetensors (or ``.bin``) shards and written in output shards, so the whole model is never in memory:
peak memory is about one input shard + one output shard + the adapter. The export is written to a temporary folder
next to ``out`` and renamed at the end: an interrupted merge never leaves a half export at ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError, MergeError
from ..files import read_json, read_tensors
from ..llava.constants import DEFAULT_VISION_TOWER, padded_vocab
from ..llava.layouts import EXPORT_INFO_FILE, to_hf, to_internal, to_original
from ..llava.spec import ModelSpec, llava_config, looks_local
from ..llava.tokenizer import image_token_id, is_llama2_sentencepiece_vocab, sentencepiece_model_bytes
from ..model.loading import added_rows
from ..model.projector import ROW_IDS, ROWS
from ..run.folder import RunFolder
from .chat_template import VICUNA_CHAT_TEMPLATE, padding_image_processor, v0_chat_template
from .gguf import check_gguf_tools, gguf_file_names, write_gguf
from .safetensors_io import ShardWriter, iter_tensors, largest_shard, low_memory_allocator, staging

logger = logging.getLogger(__name__)

__all__ = ["MergeResult", "export_info", "merge"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _local(path: str, key: str) -> Path:
    """A local checkpoint folder for ``path`` (a Hub id is fetched: config, tokenizer and weights only)."""
    p = Path(path)
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: all mean "give --base"
        raise MergeError(f"{key}: '{path}' could not be fetched ({e}); pass --base with a local copy") from None


def export_info(folder: str | Path) -> dict[str, Any] | None:
    """The ``lora_llava.json`` that :func:`merge` writes into an export (it names the run and the format); None when
    ``folder`` is not such an export (a hand-written marker of a checkpoint, with a template only, is not one)."""
    path = Path(folder) / EXPORT_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = read_json(path, dict)
    except ValueError:
        return None
    return info if info.get("format") in ("hf", "llava") and "run" in info else None


def _check_out(out: Path, overwrite: bool) -> None:
    """``--out`` may be new; an existing one only with ``--overwrite`` and only when it is an earlier export."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise MergeError(f"--out '{out}' exists; pass --overwrite to replace it")
    if not out.is_dir():
        raise MergeError(f"--out '{out}' is a file, not an earlier export: --overwrite replaces only a folder that "
                         f"lora-llava merge wrote (with its {EXPORT_INFO_FILE}); choose another --out")
    if export_info(out) is None:
        raise MergeError(f"--out '{out}' is not an earlier lora-llava export (no {EXPORT_INFO_FILE} written by merge):"
                         " --overwrite replaces only exports, never other folders; choose another --out (nothing was "
                         "deleted)")


def _check_base(base: str | None, run: _Run) -> None:
    """``--base`` must be the model the run trained on, not an export (whose weights already hold a merged LoRA),
    unless the run itself trained on that export."""
    if base is None or not Path(base).is_dir():
        return
    info = export_info(base)
    if info is None:
        return
    trained_on = run.recipe.model.llava or run.recipe.model.llm
    if trained_on and Path(trained_on).is_dir() and Path(trained_on).resolve() == Path(base).resolve():
        return
    raise MergeError(f"--base '{base}' is a lora-llava export (merged from run '{info.get('run')}'): its weights "
                     "already hold a merged LoRA adapter, and merging into it would apply one a second time. Give the "
                     f"base model the run trained on (model.{'llava' if run.recipe.model.llava else 'llm'}: "
                     f"'{trained_on}'), or leave --base out")


# --------------------------------------------------------------------------------------------------------------------
# The run folder.


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return read_tensors(path)
    except DataError as e:
        raise MergeError(str(e)) from None


class _Run:
    """What a run folder tells the merge: recipe, adapter (stage 2), projector, processor, the dtype it trained in."""

    def __init__(self, run_dir: Path):
        run = RunFolder.open(run_dir)
        if not run.path.is_dir():
            raise MergeError(f"run folder '{run_dir}' " + ("is a file, not a folder" if run.path.exists() else
                                                           "does not exist"))
        if not run.is_run():
            raise MergeError(f"'{run_dir}' is not a lora-llava run folder (no {run.recipe_file.name}) nor a checkpoint "
                             "of one (RUN/checkpoint-N)")
        self.run = run
        self.dir = run.path
        self.recipe = run.read_recipe()
        if not run.is_finished() or not run.projector_file.is_file():
            raise MergeError(f"'{run_dir}' has no usable {run.projector_file.name}: {run.unfinished_hint()}")
        tensors = _tensors(run.projector_file)
        # LLaVA v1: the trained <im_start>/<im_end> input rows travel in the projector file (ids + rows).
        self.rows = (tensors.pop(ROW_IDS).to(torch.int64), tensors.pop(ROWS)) if ROWS in tensors else None
        self.projector = {"model." + k: v for k, v in tensors.items()}
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scale = 0.0
        if self.recipe.train.stage == 2:
            self._read_adapter(run.adapter_dir)
        self.info = run.read_info()

    def _read_adapter(self, folder: Path) -> None:
        weights, config = RunFolder.adapter_files(folder)
        if not weights.is_file() or not config.is_file():
            raise MergeError(f"'{self.dir}' is a stage-2 run without an adapter ({folder} with {config.name} "
                             f"and {weights.name}): {self.run.unfinished_hint()}")
        cfg = read_json(config, dict, "an adapter config (a JSON object)")
        if cfg.get("use_dora"):
            raise MergeError(f"{config}: DoRA adapters are not supported by lora-llava merge")
        if cfg.get("fan_in_fan_out"):
            raise MergeError(f"{config}: fan_in_fan_out adapters are not supported by lora-llava merge")
        r, alpha = cfg["r"], cfg["lora_alpha"]
        self.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        raw = _tensors(weights)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in raw.items():
            if "trainable_tokens_" in key:
                continue  # the trained embedding rows: the projector file holds the same values
            m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$", key)
            if m is None:
                raise MergeError(f"{weights}: unexpected tensor '{key}' (only LoRA A/B weights can be merged)")
            parts.setdefault(m.group(1), {})[m.group(2)] = tensor
        for module, ab in parts.items():
            if set(ab) != {"A", "B"}:
                raise MergeError(f"{weights}: module '{module}' has lora_{'A' if 'A' in ab else 'B'} only")
            self.lora[module] = (ab["A"], ab["B"])


# --------------------------------------------------------------------------------------------------------------------
# The merge.


@dataclasses.dataclass
class MergeResult:
    """What :func:`merge` wrote."""

    out: Path
    format: str
    merged_modules: int
    tensors: int
    bytes: int


def _sources(run: _Run, base: str | None) -> tuple[list[tuple[Path, str]], dict[str, Any], dict[str, Any], dict]:
    """[(folder, kind)] to stream, the text config, the vision config, and LLaVA settings (layer, strategy, tower)."""
    spec = ModelSpec.from_recipe(run.recipe, base=base)
    folder = _local(spec.path, spec.key)
    settings: dict[str, Any] = {"layer": spec.feature_layer, "strategy": spec.strategy, "tower": spec.vision_path,
                                "pinpoints": spec.pinpoints, "tuned_tower": spec.tower_in_checkpoint,
                                "projector": spec.projector_type, "start_end": spec.start_end}
    vision = spec.vision_config.to_dict()
    if spec.layout == "llava-hf":
        # The tower travels inside a llava-hf checkpoint; the original layout must name one instead.
        settings["tower"] = DEFAULT_VISION_TOWER if _is_clip_l_336(vision) else None
        # The llava-hf LLaVA-NeXT releases are LLaVA-1.6, which trained its tower: the original layout carries it.
        settings["tuned_tower"] = spec.is_next
        return [(folder, spec.layout)], spec.text, vision, settings
    kind = "llava-original" if spec.layout == "llava-original" else "llama"
    # A Hub id stays a Hub id; a local tower folder would tie the export to this machine: the export gets a copy.
    settings["tower"] = None if looks_local(spec.vision_path) else spec.vision_path
    if spec.tower_in_checkpoint:  # LLaVA-1.6 trained its tower: its weights are the checkpoint's, not CLIP's
        return [(folder, kind)], spec.text, vision, settings
    return [(folder, kind), (_local(spec.vision_path, spec.vision_key), "clip")], spec.text, vision, settings


def _check_identity(projector: dict[str, torch.Tensor]) -> None:
    """A linear (LLaVA v1) projector's ``linear_2`` must still be the identity (it never trains): the original layout
    has no place for it, and an hf export is exact only with it."""
    w = projector["model.multi_modal_projector.linear_2.weight"]
    b = projector["model.multi_modal_projector.linear_2.bias"]
    if not (torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype)) and not b.any()):
        raise MergeError("the run's projector is linear (model.projector_type: linear) but its linear_2 is not the "
                         "identity; was it trained by another version of lora-llava?")


def _is_clip_l_336(vision: dict[str, Any]) -> bool:
    """LLaVA-1.5 freezes openai's CLIP ViT-L/14-336, so a llava-hf tower of that shape is that checkpoint."""
    shape = (vision.get("hidden_size"), vision.get("num_hidden_layers"), vision.get("image_size"),
             vision.get("patch_size"))
    return shape == (1024, 24, 336, 14)


def _write_tower(weights: dict[str, torch.Tensor], folder: Path, vision_cfg: dict) -> str:
    """The vision tower as a CLIP vision checkpoint in the export; returns the name the export's config gives it:
    ``./vision_tower``, relative so the export can move (lora-llava reads it relative to the export folder; the
    reference code relative to the current directory)."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    drop = ("model_type", "transformers_version")
    config = CLIPVisionConfig(**{k: v for k, v in vision_cfg.items() if k not in drop})
    config.save_pretrained(str(folder))
    size = config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(folder))
    return "./" + folder.name


def _dequantizer(recipe, train_dtype: torch.dtype):
    """W -> the NF4 round trip of W, quantized as training's loader did (same type, block size, double quant)."""
    if recipe.quant.bits != 4:
        raise MergeError(f"--from-dequantized needs a 4-bit (QLoRA) run; this run used quant.bits {recipe.quant.bits}")
    import bitsandbytes.functional as bnbf

    def round_trip(w: torch.Tensor) -> torch.Tensor:
        q, state = bnbf.quantize_4bit(w.to(train_dtype), quant_type=recipe.quant.bnb_4bit_quant_type,
                                      compress_statistics=recipe.quant.bnb_4bit_use_double_quant)
        return bnbf.dequantize_4bit(q, state).float()

    return round_trip


def merge(run_dir: str | Path, out: str | Path, format: str = "hf", dtype: str = "bf16", base: str | None = None,
          from_dequantized: bool = False, overwrite: bool = False, max_shard_size: int | None = None,
          progress: bool = True, gguf_quant: str = "f16") -> MergeResult:
    """Merge a run folder into an export; see the module docstring. ``format``: ``hf``, ``llava`` or ``gguf``
    (llama.cpp: ``model-{gguf_quant}.gguf`` + ``mmproj-f16.gguf``, see :mod:`lora_llava.export.gguf`)."""
    from tqdm.auto import tqdm
    from transformers import AutoProcessor

    if format == "gguf":
        return _merge_gguf(run_dir, Path(out), base, from_dequantized, overwrite, progress, gguf_quant)
    if format not in ("hf", "llava"):
        raise MergeError(f"--format {format!r}: choose hf, llava or gguf")
    if dtype not in _DTYPES:
        raise MergeError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    out, out_dtype = Path(out), _DTYPES[dtype]
    _check_out(out, overwrite)
    run = _Run(Path(run_dir))
    _check_base(base, run)
    train_dtype = getattr(torch, run.info.get("dtype", "torch.bfloat16").removeprefix("torch."))
    round_trip = _dequantizer(run.recipe, train_dtype) if from_dequantized else None
    try:
        processor = AutoProcessor.from_pretrained(str(run.run.processor_dir))
    except (OSError, ValueError) as e:
        raise MergeError(f"'{run.dir}': its processor/ folder cannot be read ({e})") from None
    tokenizer = processor.tokenizer
    vocab = padded_vocab(len(tokenizer))
    sources, text_cfg, vision_cfg, settings = _sources(run, base)
    linear = settings["projector"] == "linear"
    if linear:
        _check_identity(run.projector)
    if format == "hf":
        rename = to_hf
    elif settings["tuned_tower"]:
        rename = _to_original_with_tower
    else:
        rename = partial(to_original, linear=linear)
    merged: set[str] = set()
    written: set[str] = set()
    # The original layout names its vision tower; a llava-hf base of another shape gets its own tower folder.
    tower: dict[str, torch.Tensor] | None = {} if format == "llava" and settings["tower"] is None else None
    with staging(out, overwrite) as tmp:
        # Output shards no larger than the base's own (unless asked): with one input shard mapped and one output
        # shard buffered, peak memory stays near 2 x the largest shard + the adapter.
        writer = ShardWriter(tmp, max_shard_size or max(largest_shard(folder) for folder, _ in sources))
        low_memory_allocator()
        bar = tqdm(desc=f"merging into {out.name}", unit="tensor", disable=not progress)
        for folder, kind in sources:
            for key, tensor in iter_tensors(folder):
                name = to_internal(key, kind)
                # The run's projector.safetensors holds the trained projector (and a NeXT model's image_newline).
                skip = name is None or name in written or name.startswith("model.multi_modal_projector.") or (
                    name in run.projector) or (kind == "llava-original" and name.startswith("model.vision_tower.")
                                               and not settings["tuned_tower"])
                if skip:
                    continue
                module = name.removesuffix(".weight")
                if module in run.lora:
                    lora_a, lora_b = run.lora[module]
                    w = round_trip(tensor) if round_trip else tensor.to(torch.float32, copy=True)
                    if (lora_b.shape[0], lora_a.shape[1]) != tuple(w.shape):
                        raise MergeError(f"the adapter does not fit this base: {module} is {tuple(w.shape)} in "
                                         f"'{folder}' but the adapter's LoRA is {lora_b.shape[0]}x{lora_a.shape[1]} "
                                         "(an adapter trained on another model?)")
                    # In place (W += scale * B @ A) to keep fp32 temporaries to one copy of the weight.
                    tensor = w.addmm_(lora_b.float(), lora_a.float(), alpha=run.scale)
                    merged.add(module)
                if name in ("model.language_model.embed_tokens.weight", "lm_head.weight") and tensor.shape[0] < vocab:
                    # <image> and <pad> rows as training made them (the deterministic mean of the base rows).
                    base_rows = tensor.to(train_dtype)
                    tensor = torch.cat([base_rows, added_rows(base_rows, vocab - tensor.shape[0])])
                if name == "model.language_model.embed_tokens.weight" and run.rows is not None:
                    # The trained rows, as training's forward used them (cast to the base's dtype).
                    ids, rows = run.rows
                    tensor = tensor.clone()
                    tensor[ids] = rows.to(train_dtype).to(tensor.dtype)
                written.add(name)
                if tower is not None and name.startswith("model.vision_tower."):
                    tower["vision_model." + name.removeprefix("model.vision_tower.")] = tensor.contiguous()
                target = rename(name)
                if target is not None:
                    writer.add(target, tensor.to(out_dtype))
                bar.update()
        for name, tensor in run.projector.items():
            if rename(name) is not None:
                writer.add(rename(name), tensor.to(out_dtype))
            bar.update()
        bar.close()
        missing = sorted(set(run.lora) - merged)
        if missing:
            raise MergeError(f"the adapter does not fit this base: {len(missing)} adapted modules are not in it, e.g. "
                             f"{missing[:3]}")
        if format == "hf" and not any(n.startswith("model.vision_tower.") for n in written):
            raise MergeError("no vision tower weights were found in the base")
        writer.finish()
        if format == "llava" and settings.get("tower") is None:
            # A llava-hf base carries its tower inside; the original layout names one: write it next to the model.
            settings["tower"] = _write_tower(tower, tmp / "vision_tower", vision_cfg)
        _write_configs(tmp, format, run, processor, text_cfg, vision_cfg, settings, vocab, dtype)
    logger.info("merged %d LoRA modules; wrote %s (%s layout, %s, %.2f GB)", len(merged), out, format, dtype,
                writer.total / 1e9)
    return MergeResult(out, format, len(merged), len(written) + len(run.projector), writer.total)


def _merge_gguf(run_dir, out: Path, base, from_dequantized: bool, overwrite: bool, progress: bool,
                quant: str) -> MergeResult:
    """The llava-hf export in fp32 (inside the staging folder, so nothing is rounded twice), then the GGUF files
    from it tensor by tensor; the intermediate export is deleted before the rename. Needs the disk of an fp32 export
    for a while."""
    import shutil

    try:
        recipe = _Run(Path(run_dir)).recipe
    except MergeError:
        recipe = None  # the hf merge below names what is wrong with the run folder
    m = recipe.model if recipe is not None else None
    if m is not None and (m.projector_type != "mlp2x_gelu" or m.image_tokens != "plain"):
        raise MergeError("--format gguf: this run is a LLaVA v1 model (model.projector_type: linear / "
                         "model.image_tokens: start_end), which the GGUF writer does not describe; use --format hf "
                         "or --format llava")
    if recipe is not None and ModelSpec.from_recipe(recipe, base=base).is_next:
        raise MergeError("--format gguf: this run is a LLaVA-NeXT / 1.5-HD model (model.image_grid_pinpoints or a "
                         "LLaVA-NeXT checkpoint); lora-llava writes GGUF for LLaVA-1.5 only. Use --format hf (or "
                         "llava) and convert that with llama.cpp's own tools")
    check_gguf_tools(quant)
    with staging(out, overwrite) as tmp:
        hf = merge(run_dir, tmp / "hf-fp32", format="hf", dtype="fp32", base=base, from_dequantized=from_dequantized,
                   progress=progress)
        total = write_gguf(hf.out, tmp, quant, name=out.name)
        info = json.loads((hf.out / EXPORT_INFO_FILE).read_text())
        shutil.rmtree(hf.out)
        lm, mmproj = gguf_file_names(quant)
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(
            dict(info, format="gguf", dtype=quant, model=lm, mmproj=mmproj), indent=2))
    logger.info("wrote %s (gguf, %s, %.2f GB)", out, quant, total / 1e9)
    return MergeResult(out, "gguf", hf.merged_modules, hf.tensors, total)


def _to_original_with_tower(name: str) -> str | None:
    """:func:`to_original`, keeping the vision tower under the reference's names (a LLaVA-1.6 that trained it)."""
    if name.startswith("model.vision_tower."):
        return "model.vision_tower.vision_tower.vision_model." + name.removeprefix("model.vision_tower.")
    return to_original(name)


def _check_next_processor(processor, pinpoints) -> None:
    """The run's processor must be the NeXT one the model needs (grid resolutions equal to the config's)."""
    pins = getattr(processor.image_processor, "image_grid_pinpoints", None)
    if pins is None or [list(p) for p in pins] != [list(p) for p in pinpoints]:
        raise MergeError(f"the run's processor/ ({type(processor.image_processor).__name__}, grids {pins}) does not "
                         f"cut images into the model's grids {[list(p) for p in pinpoints]}; was processor/ replaced?")


def _write_slow_tokenizer(folder: Path, tok) -> None:
    """What the LLaVA reference code loads (``AutoTokenizer.from_pretrained(path, use_fast=False)`` on transformers
    4.3x): SentencePiece's ``tokenizer.model`` and a ``tokenizer_config.json`` naming ``LlamaTokenizer`` with the
    added tokens at their ids. transformers 5 reads the same config (with ``tokenizer.json``) to the same tokenizer."""
    if not is_llama2_sentencepiece_vocab(tok):
        logger.warning("the tokenizer is not the Llama-2 vocabulary: the export has no tokenizer.model, so the LLaVA "
                       "reference code (use_fast=False) cannot load its tokenizer")
        return
    (folder / "tokenizer.model").write_bytes(sentencepiece_model_bytes())
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tok.added_tokens_decoder.items())}
    config = {
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.unk_token, "pad_token": tok.pad_token,
        "additional_special_tokens": [t for t in tok.additional_special_tokens if t] if hasattr(
            tok, "additional_special_tokens") else [],
        "added_tokens_decoder": added, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "padding_side": "right", "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "use_default_system_prompt": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _write_configs(folder: Path, format: str, run: _Run, processor, text_cfg: dict, vision_cfg: dict,
                   settings: dict, vocab: int, dtype: str) -> None:
    from transformers import GenerationConfig, LlamaConfig

    tok = processor.tokenizer
    drop = ("model_type", "architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype")
    text = {k: v for k, v in text_cfg.items() if k not in drop}
    text.update(vocab_size=vocab, pad_token_id=tok.pad_token_id)
    torch_dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    if format == "hf":
        vision = {k: v for k, v in vision_cfg.items() if k not in drop}
        config = llava_config(LlamaConfig(**text), vision, image_token_id(tok), settings["layer"],
                              settings["strategy"], settings["pinpoints"], projector_type=settings["projector"],
                              pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        config.architectures = [type(config).__name__.replace("Config", "ForConditionalGeneration")]
        config.dtype = torch_dtype
        config.save_pretrained(str(folder))
        if run.recipe.template == "vicuna_v1":
            processor.chat_template = VICUNA_CHAT_TEMPLATE
        elif run.recipe.template == "llava_v0":
            processor.chat_template = v0_chat_template(settings["start_end"])
        if settings["pinpoints"]:
            # Training's NeXT processor itself: AnyRes never pads to a square, and it counts tokens per image size.
            _check_next_processor(processor, settings["pinpoints"])
        elif run.recipe.data.image_aspect_ratio == "pad":
            processor.image_processor = padding_image_processor(processor.image_processor)
        processor.save_pretrained(str(folder))
    else:
        config = dict(LlamaConfig(**text).to_dict(), model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
                      torch_dtype=torch_dtype, mm_vision_tower=settings["tower"],
                      mm_hidden_size=vision_cfg["hidden_size"], mm_projector_type=settings["projector"],
                      mm_vision_select_layer=settings["layer"], mm_vision_select_feature="patch",
                      # <im_patch> stays off: row 32000 is our <image>, and the reference never feeds patch tokens.
                      mm_use_im_start_end=settings["start_end"], mm_use_im_patch_token=False,
                      mm_patch_merge_type="flat",
                      image_aspect_ratio=run.recipe.data.image_aspect_ratio, tune_mm_mlp_adapter=False,
                      freeze_mm_mlp_adapter=False, use_mm_proj=True)
        if settings["pinpoints"]:
            # LLaVA-1.6's keys: AnyRes with un-padding and the newline embedding (model.image_newline). The pinpoints
            # are written as transformers' conversion of the 1.6 releases reads them.
            config.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                          image_grid_pinpoints=[list(p) for p in settings["pinpoints"]],
                          unfreeze_mm_vision_tower=bool(settings["tuned_tower"]))
        for k in ("transformers_version", "dtype"):
            config.pop(k, None)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tok.save_pretrained(str(folder))
        _write_slow_tokenizer(folder, tok)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(str(folder))
    (folder / EXPORT_INFO_FILE).write_text(json.dumps({
        "template": run.recipe.template, "format": format, "dtype": dtype, "run": str(run.dir.resolve()),
        "stage": run.recipe.train.stage}, indent=2))
