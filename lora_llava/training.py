"""Recipe -> model, data, collator -> ``trl.SFTTrainer`` -> a run folder.

TRL runs the loop; this module only wires the LLaVA pieces into it: the tokenized dataset, the multimodal collator,
the projector's own learning rate, the modality-length grouped sampler, the progress bar, and what a run folder
holds at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .checkpoints import CHECKPOINT_MARKER, load_trainable, resolve_resume, save_trainable
from .data import DataError, LlavaCollator, LlavaDataset, ModalityLengthGroupedSampler
from .distributed import LaunchError, check_launch, detect_launch
from .modeling import (
    build_model,
    image_token_id,
    model_summary,
    num_image_tokens,
    projector_parameters,
)
from .recipe import Recipe
from .run_folder import ADAPTER_DIR, save_run, write_atomic

logger = logging.getLogger(__name__)

__all__ = ["ADAPTER_DIR", "TrainResult", "build_datasets", "sft_config", "train"]


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


def sft_config(recipe: Recipe, model_dtype: torch.dtype):
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


def build_datasets(recipe: Recipe, processor, config, train_records: Iterable[dict] | None = None,
                   eval_records: Iterable[dict] | None = None) -> tuple[LlavaDataset, LlavaDataset | None]:
    """Tokenized train (and eval) datasets for the model ``config``: the recipe's files, or records given here."""
    d = recipe.data
    if train_records is None and not d.train:
        raise DataError("data.train: no training data given (LLaVA JSON / JSONL files, Hugging Face datasets, or "
                        "records passed to train())")
    common = dict(
        tokenizer=processor.tokenizer,
        template=recipe.template,
        image_token_id=image_token_id(config),
        num_image_tokens=num_image_tokens(config),
        max_length=d.max_length,
        image_folder=d.image_folder,
        on_bad_sample=d.on_bad_sample,
        num_proc=d.num_proc,
        cache_dir=d.cache_dir if d.cache else False,
        image_position=d.image_position,
        seed=recipe.train.seed,
    )
    if train_records is not None:
        train_ds = LlavaDataset.from_records(train_records, **common)
    else:
        train_ds = LlavaDataset.from_files(d.train, **common)
    logger.info("train data: %s", train_ds.report.summary())
    eval_ds = None
    if eval_records is not None:
        eval_ds = LlavaDataset.from_records(eval_records, **common)
    elif d.eval:
        eval_ds = LlavaDataset.from_files(d.eval, **common)
    return train_ds, eval_ds


def _trainer_class():
    from trl import SFTTrainer

    class LlavaSFTTrainer(SFTTrainer):
        """SFTTrainer with the projector in parameter groups of its own learning rate, and optionally LLaVA's
        modality-length grouped sampler (``group_by_modality_length``) for the training data."""

        def __init__(self, *args, projector_lr: float | None = None, group_by_modality_length: bool = False,
                     **kwargs):
            self.projector_lr = projector_lr
            self.group_by_modality_length = group_by_modality_length
            model = kwargs.get("model", args[0] if args else None)
            # TRL casts the trainable weights of a quantized model to bf16 in place, which rounds a loaded projector
            # (and LoRA's init) to 8 bits of mantissa. Keep the fp32 tensors and put them back: fp32 master weights.
            keep = {n: p.data for n, p in model.named_parameters() if p.requires_grad} if model is not None else {}
            super().__init__(*args, **kwargs)
            for n, p in self.model.named_parameters():
                if n in keep and p.data.dtype != keep[n].dtype:
                    p.data = keep[n]
            self._tokens = 0  # real (non-pad) input tokens of this process since the last log
            self._tokens_seen = 0
            self._last_log = None

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # Tokens seen (all processes) and tokens per second since the previous log, next to the loss.
            if "loss" in logs:
                import time

                count = torch.tensor(self._tokens, device=self.args.device)
                self._tokens = 0
                self._tokens_seen += int(self.accelerator.gather(count).sum())
                now = time.perf_counter()
                if self._last_log is not None:
                    seen, then = self._last_log
                    logs["tokens_per_second"] = round((self._tokens_seen - seen) / max(now - then, 1e-9), 1)
                self._last_log = (self._tokens_seen, now)
                logs["tokens_seen"] = self._tokens_seen
            super().log(logs, start_time)

        # Checkpoints hold what trains (adapter, projector) plus optimizer / scheduler / RNG / trainer state, and a
        # marker written last: a checkpoint without it was cut short and `--resume auto` passes over it. Older
        # checkpoints are rotated out only after the new one is complete.
        def _save_checkpoint(self, model, trial):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

            limit, self.args.save_total_limit = self.args.save_total_limit, None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            # Every process writes into the checkpoint (its RNG state; DeepSpeed its optimizer shard): the marker
            # goes in only when all of them are done.
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                run_dir = self._get_output_dir(trial=trial)
                folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                (folder / CHECKPOINT_MARKER).write_text(json.dumps({"step": self.state.global_step}))
                rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            if not self.args.should_save:
                return
            folder = Path(output_dir or self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model)
            save_trainable(model, folder)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            load_trainable(model if model is not None else self.model, Path(resume_from_checkpoint))

        def _get_train_sampler(self, train_dataset=None):
            if not self.group_by_modality_length:
                return super()._get_train_sampler(train_dataset)
            return modality_sampler(self.train_dataset if train_dataset is None else train_dataset, self.args,
                                    getattr(self, "_train_batch_size", self.args.train_batch_size))

        def create_optimizer(self, model=None):
            opt_model = self.model if model is None else model
            if self.optimizer is None and self.projector_lr is not None:
                decay = set(self.get_decay_parameter_names(opt_model))
                projector = {n for n, _ in projector_parameters(opt_model)}
                groups = []
                for is_proj in (False, True):
                    for wd in (True, False):
                        params = [p for n, p in opt_model.named_parameters()
                                  if p.requires_grad and (n in projector) == is_proj and (n in decay) == wd]
                        if not params:
                            continue
                        group = {"params": params, "weight_decay": self.args.weight_decay if wd else 0.0}
                        if is_proj:
                            group["lr"] = self.projector_lr
                        groups.append(group)
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                self.optimizer_cls_and_kwargs = (cls, {**kwargs, "params": groups})
            return super().create_optimizer(model)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                mask = inputs.get("attention_mask")
                self._tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            loss, outputs = answer_only_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every rank's tokens while DDP averages gradients across ranks.
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return LlavaSFTTrainer


def modality_sampler(dataset, args, batch_size: int) -> ModalityLengthGroupedSampler:
    """The :class:`ModalityLengthGroupedSampler` of a tokenized dataset (columns ``length`` and ``image_files``).

    ``batch_size`` is what the DataLoader batches with (the Trainer's per-device batch). The sampler takes the place
    of the Trainer's RandomSampler, so nothing else shuffles; accelerate keeps it (it only swaps RandomSamplers) and
    the Trainer reaches its ``set_epoch`` through the prepared DataLoader at every epoch.
    """
    names = getattr(dataset, "column_names", None)
    if names is not None:
        missing = {"length", "image_files"} - set(names)
        if missing:
            raise ValueError(f"train.group_by_modality_length needs the columns length and image_files; "
                             f"the training dataset lacks {sorted(missing)}")
        lengths, images = dataset["length"], dataset["image_files"]
    else:  # a LlavaDataset or any sequence of rows
        lengths = [row["length"] for row in dataset]
        images = [row["image_files"] for row in dataset]
    has_image = [bool(files) for files in images]
    logger.info("grouping batches by modality and length: %d samples with images, %d text-only",
                sum(has_image), len(has_image) - sum(has_image))
    return ModalityLengthGroupedSampler(
        lengths, has_image, batch_size, world_size=max(1, args.world_size),
        # data_seed is the Trainer's seed for data sampling when set; seed otherwise, as for its own samplers.
        seed=args.data_seed if args.data_seed is not None else args.seed,
        # One megabatch per optimizer step, as the reference LLaVA trainer does (it multiplies its world size by
        # the accumulation steps): the micro-batches of one step are all of one modality.
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )


def answer_only_loss(model, inputs: dict, num_items_in_batch=None):
    """Next-token cross-entropy computed on the supervised positions only.

    The LM head runs only on the positions whose next token is a target (a boolean ``logits_to_keep``), so the full
    (batch x length x 32k) logits are never built: on LLaVA's prompts most positions are image and prompt tokens.
    (TRL's fused head does this with a Triton kernel on GPU but scores every position elsewhere, 3x slower on CPU.)
    The call goes through ``model`` itself, so a DDP / DeepSpeed / FSDP wrapper sees the forward pass.
    Returns (loss, a small output object with the loss and the number of target tokens).
    """
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    targets = labels[:, 1:]
    mask = targets != -100
    # Position i is scored when the token at i + 1 is a target; a boolean mask gives the logits of those rows only.
    keep = torch.nn.functional.pad(mask, (0, 1), value=False)
    logits = model(**kwargs, use_cache=False, logits_to_keep=keep).logits
    loss = torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    loss = loss / torch.as_tensor(n, device=loss.device).clamp(min=1)
    return loss, {"loss": loss.detach(), "num_targets": int(mask.sum())}


def _progress_callback():
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One bar for the run, with the latest loss and learning rate."""

        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, desc="training", unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs:
                shown = {k: f"{logs[k]:.4g}" for k in ("loss", "learning_rate", "eval_loss") if k in logs}
                if "tokens_per_second" in logs:
                    shown["tok/s"] = f"{logs['tokens_per_second']:.0f}"
                self.bar.set_postfix(shown, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()


def _quiet_other_ranks(launch) -> None:
    """Only rank 0 prints: the other processes log warnings and errors only, and show no progress bars."""
    if launch.is_main:
        return
    import datasets

    logging.getLogger("lora_llava").setLevel(logging.WARNING)
    datasets.disable_progress_bars()


def train(recipe: Recipe, train_records: Iterable[dict] | None = None,
          eval_records: Iterable[dict] | None = None, resume: str | None = None) -> TrainResult:
    """Run a recipe end to end: setup, train, save. Returns a :class:`TrainResult`.

    ``train_records`` / ``eval_records`` (LLaVA-format dicts) replace ``data.train`` / ``data.eval`` when given.
    ``resume``: ``auto`` or a checkpoint folder (see :func:`resolve_resume`); the run continues exactly where the
    checkpoint left it (weights, optimizer, scheduler, RNG, data order).

    Under ``torchrun`` / ``accelerate launch`` every process calls this; rank 0 prepares the data (the others read
    its tokenization cache), prints, and writes the run folder.
    """
    from transformers import PrinterCallback, ProgressCallback, set_seed

    from .loading import resolve_dtype

    launch = detect_launch(recipe)
    problems = check_launch(recipe, launch)
    if problems:
        where = f" recipe {recipe.source}" if recipe.source else " this recipe"
        raise LaunchError(f"{launch.describe()} cannot run{where}:\n  - " + "\n  - ".join(problems))
    _quiet_other_ranks(launch)
    set_seed(recipe.train.seed)
    checkpoint = resolve_resume(recipe, resume)
    # The arguments come first: they start the process group (and DeepSpeed ZeRO-3's partitioned loading) that
    # loading the model relies on.
    args = sft_config(recipe, resolve_dtype(recipe.model.dtype))
    world = args.world_size
    logger.info("processes: %d (%s); global batch = %d per device x %d accumulation x %d processes = %d samples",
                world, launch.describe(), args.per_device_train_batch_size, args.gradient_accumulation_steps, world,
                args.per_device_train_batch_size * args.gradient_accumulation_steps * world)
    if recipe.demo is not None:
        from .demo import prepare_demo

        with args.main_process_first(desc="demo model and data"):
            prepare_demo(recipe)
    model, processor = build_model(recipe)
    config = model.config
    with args.main_process_first(desc="tokenizing"):
        train_ds, eval_ds = build_datasets(recipe, processor, config, train_records, eval_records)
    collator = LlavaCollator(
        image_processor=processor.image_processor,
        pad_token_id=processor.tokenizer.pad_token_id,
        image_folder=recipe.data.image_folder,
        image_aspect_ratio=recipe.data.image_aspect_ratio,
        padding_free=recipe.data.padding_free,
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=train_ds.to_hf(),
        eval_dataset=eval_ds.to_hf() if eval_ds is not None else None,
        data_collator=collator,
        processing_class=processor,
        projector_lr=recipe.train.projector_lr if recipe.train.stage == 2 else None,
        group_by_modality_length=recipe.train.group_by_modality_length,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback())
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
        history = json.loads((checkpoint / "trainer_state.json").read_text()).get("log_history", [])
        trainer._tokens_seen = max((h.get("tokens_seen", 0) for h in history), default=0)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    out = Path(args.output_dir)
    main = trainer.is_world_process_zero()
    if main:
        save_run(out, recipe, trainer.model, processor, trainer)
        report = json.dumps(dataclasses.asdict(train_ds.report), indent=1)
        write_atomic(out / "data_report.json", lambda p: p.write_text(report, encoding="utf-8"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return TrainResult(out, trainer.model, processor, losses, summary, main)
