"""``train(recipe)``: recipe -> model, data -> :class:`~lora_llava.train.trainer.LlavaSFTTrainer` -> a run folder.

TRL runs the loop; this module sets it up in order (launch check, arguments, model, tokenized data, trainer), runs it,
and writes the run folder at the end.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import LlavaDataset
from ..errors import DataError, LaunchError, ModelError, RecipeError, StorageError
from ..llava.anyres import AnyresGrid, limit_tiles
from ..llava.spec import ModelSpec, config_image_token_id, config_image_tokens
from ..model.projector import projector_state
from ..model.runtime import resolve_dtype
from ..model.stage import build_model, model_summary
from ..run.folder import RunFolder
from .checkpoints import check_output_dir, check_resumed_recipe, resolve_resume
from .launch import check_launch, detect_launch, device_map

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "apply_max_tiles", "build_datasets", "resolve_max_tiles", "save_run", "sft_config", "train"]


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, the trained model and processor, and the loss history."""

    output_dir: Path
    model: Any
    processor: Any
    losses: list[float]
    summary: dict[str, Any]
    main_process: bool = True
    """False in the processes of rank > 0 of a multi-process run (they write and print nothing)."""
    metrics: dict[str, Any] | None = None
    """Scores of the recipe's ``eval`` section computed at the end (``summary`` is their text), None without one."""


def sft_config(recipe, model_dtype: torch.dtype):
    """The ``trl.SFTConfig`` of the ``train`` section, with the fields lora-llava manages filled in."""
    from trl import SFTConfig

    t = recipe.train
    kwargs = {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.metadata.get("origin") != "lora-llava"}
    # TRL turns bf16 on by default; follow the model's dtype instead, so a CPU run stays in fp32.
    upstream = type(t).upstream_defaults
    if kwargs.get("bf16") == upstream.get("bf16") and kwargs.get("fp16") == upstream.get("fp16"):
        kwargs["bf16"] = model_dtype == torch.bfloat16
        kwargs["fp16"] = model_dtype == torch.float16
    if not kwargs.get("use_cpu") and not torch.cuda.is_available() and detect_launch(recipe).world_size > 1:
        kwargs["use_cpu"] = True  # several CPU processes (torchrun): accelerate runs DDP over gloo only when told so
    kwargs.update(
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
        disable_tqdm=True,  # our own bar shows loss and lr without printing a dict per step
    )
    return SFTConfig(**kwargs)


def _capped_pinpoints(recipe, grid: AnyresGrid | None) -> list[list[int]]:
    """``grid``'s resolutions with at most ``data.max_tiles`` tiles; :class:`RecipeError` when the model has no grid
    or the cap leaves no resolution."""
    limit = recipe.data.max_tiles
    if grid is None:
        raise RecipeError([f"data.max_tiles: {limit}, but the model has no AnyRes grid (a LLaVA-1.5 model sees one "
                           "view per image); remove it, or set model.image_grid_pinpoints"], recipe.source)
    try:
        return limit_tiles(grid.pinpoints, grid.tile, limit)
    except ValueError as e:
        raise RecipeError([f"data.max_tiles: {e}"], recipe.source) from None


def resolve_max_tiles(recipe) -> None:
    """Write ``data.max_tiles`` into the recipe as the model's grid: ``model.image_grid_pinpoints`` becomes the grid
    resolutions (of the recipe, or of the NeXT checkpoint) with at most that many tiles. The run folder keeps this
    recipe, so everything that rebuilds the model from it (resume, merge, chat, generate, eval, serve) cuts images
    as training did. Reads the model's config files only; a no-op without ``data.max_tiles``. Raises
    :class:`RecipeError` when the model has no grid or the cap leaves no resolution."""
    if recipe.data.max_tiles is None:
        return
    if recipe.demo is not None:
        from ..demo import prepare_demo

        prepare_demo(recipe)  # the demo's model is written on its first run; its grid is needed now
    try:
        grid = ModelSpec.from_recipe(recipe).grid
    except ModelError as e:
        raise RecipeError([str(e)], recipe.source) from None
    recipe.model.image_grid_pinpoints = _capped_pinpoints(recipe, grid)


def apply_max_tiles(recipe, config, processor=None) -> AnyresGrid | None:
    """Cap the tiles per image of a loaded AnyRes model at ``data.max_tiles``: the grid resolutions with more tiles
    are removed from the model ``config`` and from the ``processor``'s image processor alike (the model counts each
    image's tiles from its config, the processor cuts them from its own list: they must agree). For a model built by
    hand (Python API); :func:`train` caps through the recipe instead (:func:`resolve_max_tiles`), so the model is
    built capped and the run folder's recipe carries the cap to merge and inference. Returns the grid in force (None
    for a LLaVA-1.5 model); a no-op without ``data.max_tiles``. Raises :class:`RecipeError` when the cap leaves no
    resolution, or is set on a LLaVA-1.5 model."""
    grid = AnyresGrid.from_config(config)
    if recipe.data.max_tiles is None:
        return grid
    pins = _capped_pinpoints(recipe, grid)
    config.image_grid_pinpoints = pins
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        image_processor.image_grid_pinpoints = [list(p) for p in pins]
    return AnyresGrid.from_config(config)


def build_datasets(recipe, processor, config, train_records: Iterable[dict] | None = None,
                   eval_records: Iterable[dict] | None = None) -> tuple[LlavaDataset, LlavaDataset | None]:
    """Tokenized train (and eval) datasets for the model ``config``: the recipe's files, or records given here.

    For an AnyRes model (a ``LlavaNextConfig`` with ``image_grid_pinpoints``) each image's token count comes from its
    size and the config's grid (call :func:`apply_max_tiles` first so ``data.max_tiles`` is in the config)."""
    d = recipe.data
    if train_records is None and not d.train:
        raise DataError("data.train: no training data given (LLaVA JSON / JSONL files, Hugging Face datasets, or "
                        "records passed to train())")
    common = dict(
        tokenizer=processor.tokenizer,
        template=recipe.template,
        image_token_id=config_image_token_id(config),
        num_image_tokens=config_image_tokens(config),
        max_length=d.max_length,
        image_folder=d.image_folder,
        on_bad_sample=d.on_bad_sample,
        num_proc=d.num_proc,
        cache_dir=d.cache_dir if d.cache else False,
        image_position=d.image_position,
        seed=recipe.train.seed,
        grid=AnyresGrid.from_config(config),
    )
    if train_records is not None:
        train_ds = LlavaDataset.from_records(train_records, **common)
    else:
        train_ds = LlavaDataset.from_files(d.train, **common)
    logger.info("train data: %s", train_ds.report.summary())
    if common["grid"] is not None:
        counts = sorted(sum(c) for c in train_ds.rows["image_tokens"] if c)
        if counts:
            g = common["grid"]
            logger.info("AnyRes grid %s of %d px tiles (up to %d tiles): image tokens per sample min %d, median %d, "
                        "max %d", [list(p) for p in g.pinpoints], g.tile, g.max_tiles, counts[0],
                        counts[len(counts) // 2], counts[-1])
    eval_ds = None
    if eval_records is not None:
        eval_ds = LlavaDataset.from_records(eval_records, **common)
    elif d.eval:
        eval_ds = LlavaDataset.from_files(d.eval, **common)
    return train_ds, eval_ds


def _quiet_other_ranks(launch) -> None:
    """Only rank 0 prints: the other processes log warnings and errors only, and show no progress bars."""
    if launch.is_main:
        return
    import datasets

    logging.getLogger("lora_llava").setLevel(logging.WARNING)
    datasets.disable_progress_bars()


def _run_info(model) -> dict[str, Any]:
    """What a merge needs to rebuild exactly what trained: the dtype the base was loaded (and quantized) in."""
    from .. import __version__

    return {"dtype": str(model.get_input_embeddings().weight.dtype), "lora_llava": __version__,
            "vocab": model.get_input_embeddings().weight.shape[0]}


def start_run(output_dir: Path, recipe, model, processor) -> None:
    """What a run folder holds from the start (recipe, processor, run info), so that its checkpoints are usable
    (merge, chat, generate) even when the run is killed before its final save."""
    run = RunFolder(output_dir)
    run.write_recipe(recipe)
    run.write_folder(run.processor_dir, lambda tmp: processor.save_pretrained(str(tmp)))
    run.write_json(run.info_file, _run_info(model))


def save_run(output_dir: Path, recipe, model, processor, trainer, data_report) -> None:
    """Write what a run folder holds: recipe, adapter, projector, processor, trainer state, run info, data report,
    loss plot (see :class:`~lora_llava.run.folder.RunFolder`)."""
    run = RunFolder(output_dir)
    run.write_recipe(recipe)
    run.write_projector(projector_state(model))
    if recipe.train.stage == 2:
        run.write_folder(run.adapter_dir, lambda tmp: model.save_pretrained(str(tmp), save_embedding_layers=False))
    run.write_folder(run.processor_dir, lambda tmp: processor.save_pretrained(str(tmp)))
    run.write_trainer_state(trainer.state)
    info = _run_info(model)
    if torch.cuda.is_available():
        info["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
        info["gpu"] = torch.cuda.get_device_name()
    run.write_json(run.info_file, info)
    run.write_json(run.data_report_file, data_report.to_json())
    run.write_loss_plot(trainer.state.log_history)


_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_BYTES_PER_TRAINABLE = 4 + 8  # fp32 weights + Adam's two moments, what a checkpoint holds per trainable parameter


def _warn_free_space(folder: Path, recipe, args, summary: dict[str, Any]) -> None:
    """Warn (before step 1) when the checkpoints and final save will not fit on the output folder's disk (roughly:
    optimizer state and trainable weights per checkpoint; the frozen base is never saved)."""
    t = recipe.train
    strategy = str(getattr(t.save_strategy, "value", t.save_strategy))
    per_checkpoint = summary["trainable"] * _BYTES_PER_TRAINABLE
    if strategy == "steps" and args.max_steps > 0:
        steps = t.save_steps if t.save_steps >= 1 else max(1, int(t.save_steps * args.max_steps))
        count = max(1, args.max_steps // steps)
    else:
        count = 0 if strategy == "no" else 1  # per epoch, or steps without max_steps: at least one
    if t.save_total_limit:
        count = min(count, t.save_total_limit)
    need = count * per_checkpoint + summary["trainable"] * 4  # + the final adapter and projector
    free = shutil.disk_usage(folder).free
    if need > free:
        logger.warning("'%s' has %.2f GB free, but this run will write about %.2f GB (%d checkpoints of ~%.2f GB and "
                       "the final weights); free some space, set train.save_total_limit, or save less often",
                       folder, free / 1e9, need / 1e9, count, per_checkpoint / 1e9)


def _what_is_left(recipe, output: RunFolder, replaced: Path | None) -> str:
    """What a run that stopped early leaves, and how to go on."""
    checkpoint = output.last_checkpoint()
    if checkpoint is not None:
        text = (f"the newest complete checkpoint is '{checkpoint}': continue with `lora-llava sft RECIPE --resume "
                "auto`, or use it with merge / chat / generate")
    else:
        strategy = getattr(recipe.train.save_strategy, "value", recipe.train.save_strategy)
        when = "never saves during training" if strategy == "no" else \
            f"saves every {recipe.train.save_steps} steps" if strategy == "steps" else f"saves each {strategy}"
        text = (f"nothing trained was saved (no checkpoint yet: train.save_strategy '{strategy}' {when}); "
                f"'{output.path}' holds only the recipe and processor")
    if replaced is not None:
        text += f"; the run it was to replace (--overwrite) is kept in '{replaced}'"
    return text


def train(recipe, train_records: Iterable[dict] | None = None, eval_records: Iterable[dict] | None = None,
          resume: str | None = None, callbacks: Sequence[Any] = (), overwrite: bool = False) -> TrainResult:
    """Run a recipe end to end: setup, train, save. Returns a :class:`TrainResult`.

    ``train_records`` / ``eval_records`` (LLaVA-format dicts) replace ``data.train`` / ``data.eval`` when given.
    ``resume``: ``auto`` or a checkpoint folder (see :func:`resolve_resume`); the run continues exactly where the
    checkpoint left it (weights, optimizer, scheduler, RNG, data order). ``callbacks``: transformers
    ``TrainerCallback`` s added to the trainer (see :func:`~lora_llava.train.trainer.build_trainer`).

    A ``train.output_dir`` that holds a finished run, or checkpoints, is refused unless the run is resumed or
    ``overwrite``; then the old run's files are set aside and deleted only once the new run is saved.

    Under ``torchrun`` / ``accelerate launch`` every process calls this; rank 0 prepares the data (the others read
    its tokenization cache), prints, and writes the run folder.
    """
    from transformers import set_seed

    from .trainer import build_trainer

    launch = detect_launch(recipe)
    problems = check_launch(recipe, launch)
    if problems:
        where = f" recipe {recipe.source}" if recipe.source else " this recipe"
        raise LaunchError(f"{launch.describe()} cannot run{where}:\n  - " + "\n  - ".join(problems))
    strategy = str(getattr(recipe.train.eval_strategy, "value", recipe.train.eval_strategy))
    if strategy != "no" and not recipe.data.eval and eval_records is None:
        raise RecipeError([f"train.eval_strategy: '{strategy}' needs evaluation data (data.eval, or eval_records "
                           "passed to train())"], recipe.source)
    _quiet_other_ranks(launch)
    resolve_max_tiles(recipe)  # before the resume check: a run folder keeps the recipe with the cap resolved
    checkpoint = resolve_resume(recipe, resume)
    check_output_dir(recipe, resume, checkpoint, overwrite)
    check_resumed_recipe(recipe, checkpoint)
    output = RunFolder(recipe.train.output_dir)
    if launch.is_main:
        try:
            output.check_writable()  # before hours of training, not after
        except OSError as e:
            raise RecipeError([f"train.output_dir: '{recipe.train.output_dir}' cannot be written "
                               f"({e.strerror or e})"], recipe.source) from None
    set_seed(recipe.train.seed)
    # The arguments come first: they start the process group (and DeepSpeed ZeRO-3's partitioned loading) that
    # loading the model relies on.
    args = sft_config(recipe, resolve_dtype(recipe.model.dtype))
    world = args.world_size
    logger.info("processes: %d (%s); global batch = %d per device x %d accumulation x %d processes = %d samples",
                world, launch.describe(), args.per_device_train_batch_size, args.gradient_accumulation_steps, world,
                args.per_device_train_batch_size * args.gradient_accumulation_steps * world)
    if recipe.demo is not None:
        from ..demo import prepare_demo

        with args.main_process_first(desc="demo model and data"):
            prepare_demo(recipe)
    model, processor = build_model(recipe, device_map(launch))
    apply_max_tiles(recipe, model.config, processor)  # built capped already (resolve_max_tiles); a no-op check
    with args.main_process_first(desc="tokenizing"):
        train_ds, eval_ds = build_datasets(recipe, processor, model.config, train_records, eval_records)
    trainer = build_trainer(recipe, model, processor, train_ds.to_hf(),
                            eval_ds.to_hf() if eval_ds is not None else None, args=args, callbacks=callbacks)
    summary = model_summary(trainer.model)
    logger.info(
        "model: %s parameters, %s trainable (LoRA %s, projector %s); %d quantized modules; dtype %s; attention %s",
        f"{summary['total']:,}", f"{summary['trainable']:,}", f"{summary['lora']:,}", f"{summary['projector']:,}",
        summary["quantized_modules"], summary["dtype"], summary["attention"],
    )
    if recipe.data.padding_free and summary["attention"] != "flash_attention_2":
        logger.warning("data.padding_free with %s attention: each batch row gets a dense block-causal mask, so "
                       "attention spans all its samples (slower than padding, see benchmarks/RESULTS.md); it pays off "
                       "with flash_attention_2", summary["attention"])
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
    replaced = None
    if launch.is_main:
        if overwrite and checkpoint is None:
            # Only now, with the model and data ready: a run that fails to start leaves the old one in place.
            replaced = output.set_aside()
            if replaced is not None:
                logger.warning("--overwrite: the previous run's files in %s are moved to %s and deleted once this run "
                               "is saved (should this run fail, they stay there)", output.path, replaced)
        start_run(output.path, recipe, model, processor)  # a killed run's checkpoints stay usable
        _warn_free_space(output.path, recipe, args, summary)
    out = Path(args.output_dir)
    main = trainer.is_world_process_zero()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        if main:
            save_run(out, recipe, trainer.model, processor, trainer, train_ds.report)
    except KeyboardInterrupt:
        # Ctrl-C: say what is left to continue from (or that nothing is), instead of a bare "interrupted".
        raise KeyboardInterrupt(f"training stopped at step {trainer.state.global_step}; "
                                f"{_what_is_left(recipe, output, replaced)}") from None
    except OSError as e:
        if e.errno not in _STORAGE_ERRNOS:
            raise
        # A checkpoint cut short is never marked complete, and each run file is written atomically: what was
        # complete before stays usable.
        raise StorageError(f"writing to '{output.path}' failed at step {trainer.state.global_step} "
                           f"({e.strerror or e}{f': {e.filename}' if e.filename else ''}); "
                           + _what_is_left(recipe, output, replaced)) from None
    if main:
        output.remove_set_aside(replaced)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = TrainResult(out, trainer.model, processor, losses, summary, main)
    if main and recipe.eval is not None:
        from ..eval.after_training import eval_after_training

        result.metrics = eval_after_training(recipe, out, trainer.model, processor)
    return result
