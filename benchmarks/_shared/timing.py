"""Timing helpers: the median of repeated calls, and :func:`step_recorder`, a ``TrainerCallback`` that records every
training step (wall and compute time, optimizer time, the batch's tokens) and the peak memory of the run."""

from __future__ import annotations

import resource
import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _empty() -> dict:
    return {"lengths": [], "images": 0, "rows": 0, "padded": 0, "targets": 0}


def step_recorder():
    """A new ``StepRecorder`` callback (a function, so that importing this module does not import transformers).

    Per step (``torch.cuda.synchronize`` on a GPU before each reading): ``wall`` from one ``on_step_end`` to the next
    (data loading and logging included), ``compute`` from ``on_step_begin``, ``optimizer`` (the optimizer step), and
    the batch the model was called with: non-pad sample lengths (attention-mask sums, or the padding-free samples'
    position runs), images, rows, padded tokens, supervised targets. The batch is read by a forward pre-hook on the
    trained model, so it is what the model saw, whatever process collated it. Peak memory: ``max_memory_allocated``
    after ``reset_peak_memory_stats`` at ``on_train_begin`` on a GPU, the process's peak RSS on the CPU.
    """
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepRecorder(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.pending = _empty()
            self.info: dict = {}
            self.last = self.begin = self.opt_start = 0.0
            self.opt = 0.0
            self._hook = None

        def batch(self, inputs: dict) -> None:
            """Add one micro-batch (the model's keyword arguments) to the current step."""
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            if mask is not None:
                lengths = mask.sum(1).tolist()
            elif inputs.get("position_ids") is not None:  # padding-free: one row, positions restart at 0 per sample
                pos = inputs["position_ids"][0]
                starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
                lengths = [b - a for a, b in zip(starts, starts[1:])]
            else:
                lengths = [ids.shape[1]] * ids.shape[0]
            p = self.pending
            p["lengths"] += [int(x) for x in lengths]
            p["images"] += int(inputs["pixel_values"].shape[0]) if inputs.get("pixel_values") is not None else 0
            p["rows"] += ids.shape[0]
            p["padded"] += ids.numel()
            p["targets"] += _targets(inputs)

        def _forward_pre_hook(self, module, args, kwargs):
            if module.training and torch.is_grad_enabled() and "input_ids" in kwargs:
                self.batch(kwargs)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self._hook = model.register_forward_pre_hook(self._forward_pre_hook, with_kwargs=True)
            self.last = now()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = now()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.opt_start = now()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.opt = now() - self.opt_start

        def on_step_end(self, args, state, control, **kwargs):
            t = now()
            p = self.pending
            self.steps.append({"wall": t - self.last, "compute": t - self.begin, "optimizer": self.opt,
                               "tokens": sum(p["lengths"]), **p})
            self.pending = _empty()
            self.last = t

        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            if self._hook is not None:
                self._hook.remove()
            if cuda:
                self.info.update(peak_bytes=torch.cuda.max_memory_allocated(), peak_kind="cuda max_memory_allocated",
                                 reserved_bytes=torch.cuda.max_memory_reserved())
            else:
                self.info.update(peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                 peak_kind="peak RSS of the process")
            base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = getattr(optimizer, "optimizer", optimizer)
            self.info.update(
                # The language model's kernel (the benchmark may switch it alone, e.g. to flex_attention).
                attention=getattr(getattr(base_model.config, "text_config", base_model.config), "_attn_implementation",
                                  "?"),
                compute_dtype=str(base_model.get_input_embeddings().weight.dtype).removeprefix("torch."),
                trainable_dtype=",".join(sorted({str(p.dtype).removeprefix("torch.") for p in trainable})),
                trainable_params=sum(p.numel() for p in trainable),
                optimizer=f"{args.optim.value if hasattr(args.optim, 'value') else args.optim} "
                          f"({type(opt).__name__})",
            )

    return StepRecorder()


def _targets(inputs: dict) -> int:
    """Supervised targets of a micro-batch: from ``labels`` when the model gets them (TRL), else from the boolean
    ``logits_to_keep`` of lora-llava's answer-only loss (the positions whose next token is a target)."""
    import torch

    labels, keep = inputs.get("labels"), inputs.get("logits_to_keep")
    if labels is not None:
        return int((labels[:, 1:] != -100).sum())
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool:
        return int(keep.sum())
    return 0
