"""The model's one thread: queued requests answered in batches, each answer streamed as it grows.

Requests waiting when the model becomes free are batched (up to ``max_batch``, those with the same sampling settings
together; left padding, as ``generate``). Each row keeps its own state: its stop strings, its token budget, the text
shown so far; a finished row stops at once (the rest of the batch goes on). Greedy answers are those of
``lora-llava chat``: same prompt function (training's ``encode_prompt``), same cutting and stripping.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..data import encode_prompt, get_template
from ..data.images import expand_to_square, mean_fill
from ..infer.chat import with_image_tag
from ..infer.generate import image_aspect, image_inputs, image_mean, image_tokens_of, left_pad, placement, text_stop
from ..llava.spec import config_image_token_id
from .protocol import ChatRequest, RequestError

__all__ = ["Engine", "Job"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    """One request in the engine. ``emit(event)`` receives ``("delta", text)``, then ``("done", answer,
    finish_reason, completion_tokens)`` or ``("error", message)``; it is called from the engine's thread."""

    ids: list[int]
    pixel_values: torch.Tensor | None
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    emit: Callable[[tuple], None]
    tokens: list[int] = dataclasses.field(default_factory=list)
    shown: str = ""
    finish: str | None = None
    image_sizes: torch.Tensor | None = None
    """LLaVA-NeXT: the image's ``(height, width)``, which ``generate`` needs with its pixels."""


def _batch_images(jobs: list[Job]) -> dict[str, torch.Tensor]:
    """The pixels (and LLaVA-NeXT image sizes) of the jobs' images, one batch: a NeXT image's tiles are padded with
    zero tiles to the most of the batch, which the model drops again (it counts each image's tiles from its size)."""
    if not jobs:
        return {}
    pixels = [job.pixel_values for job in jobs]
    if pixels[0].dim() == 5:
        most = max(p.shape[1] for p in pixels)
        pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
    out = {"pixel_values": torch.cat(pixels)}
    if jobs[0].image_sizes is not None:
        out["image_sizes"] = torch.cat([job.image_sizes for job in jobs])
    return out


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Engine:
    """Owns ``model``; :meth:`submit` queues a :class:`Job`. ``prepare`` turns a request into a job (or a 400)."""

    def __init__(self, model, processor, template: str, image_aspect_ratio: str = "pad", max_batch: int = 8,
                 batch_wait_s: float = 0.01):
        self.model, self.processor = model, processor
        self.template = get_template(template)
        self.image_aspect_ratio = image_aspect_ratio
        self.max_batch = max(1, max_batch)
        self.batch_wait_s = batch_wait_s
        self.tokenizer = processor.tokenizer
        self.template_stop = text_stop(self.template, self.tokenizer)
        config = getattr(model.config, "text_config", model.config)
        self.context = getattr(config, "max_position_embeddings", None)
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.batches: list[int] = []  # sizes of the batches run (the tests read it)
        self._thread = threading.Thread(target=self._loop, name="lora-llava-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------------------------------
    def prepare(self, request: ChatRequest, emit: Callable[[tuple], None]) -> Job:
        """The job for ``request``: the prompt as training encodes it, the image as training prepares it."""
        if self.template.name == "plain" and request.image is None:
            raise RequestError("this model (plain template: a stage-1 run) only captions an image; send one",
                               "messages")
        pixel_values, image_sizes, images = None, None, []
        if request.image is not None:
            image = request.image
            if image_aspect(self.model.config, self.image_aspect_ratio) == "pad":
                image = expand_to_square(image, mean_fill(image_mean(self.processor)))
            images = [image]
            inputs = image_inputs(self.processor, images, self.model)
            pixel_values, image_sizes = inputs["pixel_values"], inputs.get("image_sizes")
        turns = with_image_tag(request.turns, request.image is not None)
        ids = encode_prompt(turns, self.tokenizer, self.template, config_image_token_id(self.model.config),
                            image_tokens_of(self.model.config, images))
        max_tokens = request.max_tokens
        if self.context is not None and not request.max_tokens_given:
            max_tokens = min(max_tokens, self.context - len(ids))  # what the context leaves
        if self.context is not None and (max_tokens < 1 or len(ids) + max_tokens > self.context):
            raise RequestError(f"the prompt is {len(ids)} tokens and max_tokens {request.max_tokens}; the model's "
                               f"context is {self.context} tokens", "max_tokens" if request.max_tokens_given and
                               len(ids) < self.context else "messages")
        stops = [s for s in [self.template_stop, *request.stop] if s]
        return Job(ids, pixel_values, max_tokens, request.temperature, request.top_p, stops, emit,
                   image_sizes=image_sizes)

    def submit(self, job: Job) -> None:
        with self._cv:
            self._waiting.append(job)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    # ---------------------------------------------------------------------------------------------------------------
    def _next_batch(self) -> list[Job]:
        with self._cv:
            while not self._waiting and not self._closed:
                self._cv.wait()
            if self._closed:
                return []
            # A short window for requests that arrive together to be answered together.
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._waiting) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            first = self._waiting.popleft()
            batch, rest = [first], deque()
            while self._waiting:
                job = self._waiting.popleft()
                same = (job.temperature, job.top_p) == (first.temperature, first.top_p)
                (batch if same and len(batch) < self.max_batch else rest).append(job)
            self._waiting.extendleft(reversed(rest))
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            self.batches.append(len(batch))
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch must not take the server down
                logger.exception("generation failed")
                for job in batch:
                    if job.finish is None:
                        job.finish = "error"
                        job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))

    def _step(self, job: Job, token: int) -> None:
        """One new token of ``job``: update its text, emit what is settled, finish it on EOS / stop / budget."""
        if job.finish is not None:
            return
        if token == self.tokenizer.eos_token_id:
            job.finish = "stop"
        else:
            job.tokens.append(token)
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        text, stopped = _cut(text, job.stops)
        if stopped:
            job.finish = "stop"
        elif job.finish is None and len(job.tokens) >= job.max_tokens:
            job.finish = "length"
        if job.finish is None:
            # Hold back what the next token may change: a partial stop string, a partial character, spaces.
            for stop in job.stops:
                for k in range(len(stop) - 1, 0, -1):
                    if text.endswith(stop[:k]):
                        text = text[:-k]
                        break
            text = text.rstrip("\ufffd")
        self._show(job, text.strip())

    @staticmethod
    def _show(job: Job, text: str) -> None:
        """Emit what ``text`` adds to what was shown, then ``done`` once the job has finished."""
        if text.startswith(job.shown) and len(text) > len(job.shown):
            job.emit(("delta", text[len(job.shown):]))
            job.shown = text
        if job.finish:
            job.emit(("done", text, job.finish, len(job.tokens)))

    @torch.no_grad()
    def _run(self, batch: list[Job]) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer
        device, _ = placement(self.model)
        input_ids, mask = left_pad([job.ids for job in batch], tok.pad_token_id)
        kwargs: dict[str, Any] = _batch_images([job for job in batch if job.pixel_values is not None])
        first = batch[0]
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
        else:
            kwargs.update(do_sample=False)
        engine = self

        class Rows:  # streamer: generate() hands it the prompt, then one token per row per step
            seen_prompt = False

            def put(self, value: torch.Tensor) -> None:
                if not self.seen_prompt:
                    self.seen_prompt = True
                    return
                for job, token in zip(batch, value.reshape(-1).tolist()):
                    engine._step(job, int(token))

            def end(self) -> None:
                pass

        class Finished(StoppingCriteria):
            def __call__(self, ids, scores, **kw):
                return torch.tensor([job.finish is not None for job in batch], dtype=torch.bool, device=ids.device)

        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            self.model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max(job.max_tokens for job in batch), use_cache=True, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, streamer=Rows(), stopping_criteria=StoppingCriteriaList([Finished()]),
                **kwargs,
            )
        finally:
            self.model.train(was_training)
        for job in batch:  # rows that ran out of steps without a decision
            if job.finish is None:
                job.finish = "length"
                self._show(job, _cut(tok.decode(job.tokens, skip_special_tokens=True), job.stops)[0].strip())
        logger.debug("batch of %d answered in %.2f s", len(batch), time.perf_counter() - started)
