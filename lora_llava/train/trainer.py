"""``LlavaSFTTrainer``: TRL's SFTTrainer with LLaVA's pieces, and :func:`build_trainer`, which wires a recipe into it.

What it adds to TRL: the projector in parameter groups of its own learning rate, LLaVA's modality-length grouped
sampler, the answer-only loss (:mod:`lora_llava.train.loss`), tokens-per-second logging, and small checkpoints (adapter
+ projector + optimizer state) that are marked complete only when every process has written its part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from trl import SFTTrainer

from ..data import LlavaCollator, ModalityLengthGroupedSampler
from ..files import read_json
from ..llava.anyres import AnyresGrid
from ..model.projector import projector_parameters
from ..run.folder import RunFolder
from .checkpoints import load_trainable, save_trainable
from .loss import answer_only_loss
from .progress import ProgressBar

logger = logging.getLogger(__name__)

__all__ = ["CheckpointMarker", "LlavaSFTTrainer", "build_trainer", "modality_sampler"]


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
        self.add_callback(CheckpointMarker())
        self._tokens = 0  # real (non-pad) input tokens of this process since the last log
        self.tokens_seen = 0
        """Real (non-pad) input tokens of all processes trained on so far (restored on resume)."""
        self._last_log = None

    def add_callback(self, callback) -> None:
        """As the Trainer's, but the checkpoint marker stays the last callback: every other ``on_save`` runs before a
        checkpoint counts as complete."""
        super().add_callback(callback)
        callbacks = self.callback_handler.callbacks
        for marker in [c for c in callbacks if isinstance(c, CheckpointMarker)]:
            callbacks.remove(marker)
            callbacks.append(marker)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Tokens seen (all processes) and tokens per second since the previous log, next to the loss.
        if "loss" in logs:
            count = torch.tensor(self._tokens, device=self.args.device)
            self._tokens = 0
            self.tokens_seen += int(self.accelerator.gather(count).sum())
            now = time.perf_counter()
            if self._last_log is not None:
                seen, then = self._last_log
                logs["tokens_per_second"] = round((self.tokens_seen - seen) / max(now - then, 1e-9), 1)
            self._last_log = (self.tokens_seen, now)
            logs["tokens_seen"] = self.tokens_seen
        super().log(logs, start_time)

    # Checkpoints hold what trains (adapter, projector) plus optimizer / scheduler / RNG / trainer state, and a
    # marker written last by CheckpointMarker: a checkpoint without it was cut short and `--resume auto` passes over
    # it. Older checkpoints are rotated out only after the new one is complete, so rotation waits for the marker too.
    def _save_checkpoint(self, model, trial):
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        save_trainable(model, folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        folder = Path(resume_from_checkpoint)
        load_trainable(model if model is not None else self.model, folder)
        state = RunFolder(folder).trainer_state_file
        if state.is_file():
            history = read_json(state, dict).get("log_history", [])
            self.tokens_seen = max((h.get("tokens_seen", 0) for h in history), default=0)

    def _get_train_sampler(self, train_dataset=None):
        if not self.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        return modality_sampler(self.train_dataset if train_dataset is None else train_dataset, self.args,
                                getattr(self, "_train_batch_size", self.args.train_batch_size))

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None and self.projector_lr is not None:
            decay = set(self.get_decay_parameter_names(opt_model))
            # LLaVA v1's trained <im_start>/<im_end> rows go with the projector: v1 trained both at its stage-2 lr.
            projector = {n for n, _ in projector_parameters(opt_model)} | {
                n for n, _ in opt_model.named_parameters() if "trainable_tokens_delta" in n}
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


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once every process has written its part (its RNG state; DeepSpeed its optimizer
    shard), then rotates older checkpoints out (``save_total_limit``). :class:`LlavaSFTTrainer` adds it and keeps it
    last among its callbacks, so any other callback's ``on_save`` runs before the checkpoint counts as complete."""

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState
        from transformers.trainer_utils import rotate_checkpoints

        PartialState().wait_for_everyone()
        if args.should_save:
            RunFolder.mark_complete(RunFolder(args.output_dir).checkpoint(state.global_step), state.global_step)
            rotate_checkpoints(output_dir=args.output_dir, save_total_limit=args.save_total_limit,
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)


def build_trainer(recipe, model, processor, train_dataset, eval_dataset=None, args=None,
                  callbacks: Sequence[TrainerCallback] = (), collator=None) -> LlavaSFTTrainer:
    """A :class:`LlavaSFTTrainer` for ``recipe``: its ``SFTConfig`` (``args``, default :func:`sft_config`), the
    multimodal collator (default: :class:`LlavaCollator` of the recipe's data section), the projector learning rate of
    stage 2, modality-length grouping, the progress bar and ``callbacks``."""
    from .sft import sft_config

    args = args if args is not None else sft_config(recipe, model.get_input_embeddings().weight.dtype)
    if collator is None:
        collator = LlavaCollator(
            image_processor=processor.image_processor,
            pad_token_id=processor.tokenizer.pad_token_id,
            image_folder=recipe.data.image_folder,
            image_aspect_ratio=recipe.data.image_aspect_ratio,
            padding_free=recipe.data.padding_free,
            grid=AnyresGrid.from_config(model.config),
        )
    trainer = LlavaSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
        projector_lr=recipe.train.projector_lr if recipe.train.stage == 2 else None,
        group_by_modality_length=recipe.train.group_by_modality_length,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    for callback in (ProgressBar(), *callbacks):
        trainer.add_callback(callback)
    return trainer
