"""Chat: one conversation about an image (or none), answers streamed as they grow; multi-turn sessions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..data import encode_prompt, get_template, load_image
from ..data.templates import IMAGE_TAG
from ..errors import ImageError, InferenceError
from ..llava.constants import CLIP_MEAN
from ..llava.spec import config_image_token_id
from .generate import (
    AnswerStreamer,
    image_aspect,
    image_inputs,
    image_mean,
    image_tokens_of,
    placement,
    stopping_criteria,
    text_stop,
)

__all__ = ["ChatSession", "chat", "open_image", "with_image_tag"]


def open_image(path: str | Path, image_aspect_ratio: str = "pad", mean: Sequence[float] = CLIP_MEAN):
    """Any image file the user names (not confined to an image folder), decoded and prepared as in training."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ImageError(f"image '{path}' does not exist")
    if not p.is_file():
        raise ImageError(f"image '{path}' is not a file")
    p = p.resolve()
    # load_image keeps paths under a root; the user named this file, so its root is the filesystem's.
    return load_image(p.anchor, str(p), image_aspect_ratio, tuple(mean))


def with_image_tag(turns: Sequence[tuple[str, str]], has_image: bool) -> list[tuple[str, str]]:
    """The turns with ``<image>\\n`` in front of the first question when there is an image and no tag yet.

    Only the first human turn may carry the tag (once), and only when there is an image: as LLaVA trains.
    """
    out = [tuple(t) for t in turns]
    for i, (role, text) in enumerate(out):
        n = text.count(IMAGE_TAG)
        if n and (not has_image or i > 0 or n > 1 or role != "human"):
            why = "there is no image" if not has_image else "only the first question carries the image, once"
            raise InferenceError(f"turn {i + 1} has {n} '{IMAGE_TAG}' tag{'s' if n > 1 else ''} but {why}")
    if has_image and out and IMAGE_TAG not in out[0][1]:
        out[0] = (out[0][0], f"{IMAGE_TAG}\n{out[0][1]}")
    return out


def _context_limit(model) -> int | None:
    config = getattr(model.config, "text_config", model.config)
    return getattr(config, "max_position_embeddings", None)


@torch.no_grad()
def _answer(model, processor, ids: list[int], images: dict | None, stop: str | None, max_new_tokens: int,
            temperature: float, stream: Callable[[str], None] | None) -> str:
    tok = processor.tokenizer
    device, _ = placement(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    streamer = AnswerStreamer(tok, stop, stream or (lambda _text: None))
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    kwargs = images or {}
    was_training = model.training
    model.eval()
    try:
        model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            use_cache=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, streamer=streamer,
            stopping_criteria=stopping_criteria(tok, stop, len(ids)), **sampling, **kwargs,
        )
    finally:
        model.train(was_training)
    return streamer.answer


def chat(model, processor, turns: Sequence[tuple[str, str]], image=None, template: str = "vicuna_v1",
         image_aspect_ratio: str = "pad", max_new_tokens: int = 512, temperature: float = 0.0,
         stream: Callable[[str], None] | None = None) -> str:
    """Answer one conversation (``(role, text)`` turns ending on a human turn); returns the answer.

    ``image`` (a path or a PIL image, optional) goes with the first question, whose ``<image>`` tag is added when it
    has none. ``stream(text)`` receives the answer piece by piece as it is generated; the pieces join to the returned
    answer. Greedy unless ``temperature`` > 0.
    """
    tmpl = get_template(template)
    tok = processor.tokenizer
    inputs, images = None, []
    if image is not None:
        if isinstance(image, (str, Path)):
            image = open_image(image, image_aspect(model.config, image_aspect_ratio), image_mean(processor))
        images = [image]
        inputs = image_inputs(processor, images, model)
    ids = encode_prompt(with_image_tag(turns, image is not None), tok, tmpl, config_image_token_id(model.config),
                        image_tokens_of(model.config, images))
    return _answer(model, processor, ids, inputs, text_stop(tmpl, tok), max_new_tokens, temperature, stream)


class ChatSession:
    """A multi-turn conversation about one image (or none): each question is asked with the history before it.

    The whole conversation is re-encoded with training's ``encode_prompt`` for every question, the image tag on the
    first question only. When it no longer fits the model's context with ``max_new_tokens`` to spare, the oldest
    rounds are left out. The ``plain`` template (stage-1 captioning) has no history: every question stands alone.
    """

    def __init__(self, model, processor, template: str = "vicuna_v1", image=None, image_aspect_ratio: str = "pad",
                 max_new_tokens: int = 512, temperature: float = 0.0):
        self.model = model
        self.processor = processor
        self.template = get_template(template)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.history: list[tuple[str, str]] = []
        self.pixel_values = None
        self.image_inputs: dict | None = None
        self.images: list = []
        if self.template.name == "plain" and image is None:
            raise InferenceError("the plain template (a stage-1 run) only captions an image; give an image to chat "
                                 "about")
        if image is not None:
            if isinstance(image, (str, Path)):
                image = open_image(image, image_aspect(model.config, image_aspect_ratio), image_mean(processor))
            self.images = [image]
            self.image_inputs = image_inputs(processor, self.images, model)
            self.pixel_values = self.image_inputs["pixel_values"]

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        self.history = []

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the prompt that asks ``question`` after the history (oldest rounds dropped to fit)."""
        tok, config = self.processor.tokenizer, self.model.config
        history = [] if self.template.name == "plain" else list(self.history)
        limit = _context_limit(self.model)
        while True:
            turns = with_image_tag([*history, ("human", question)], self.pixel_values is not None)
            ids = encode_prompt(turns, tok, self.template, config_image_token_id(config),
                                image_tokens_of(config, self.images))
            if limit is None or len(ids) + self.max_new_tokens <= limit or not history:
                break
            history = history[2:]
        if limit is not None and len(ids) >= limit:
            raise InferenceError(f"the question makes a prompt of {len(ids)} tokens; the model takes {limit}")
        return ids

    def ask(self, question: str, stream: Callable[[str], None] | None = None) -> str:
        """Answer ``question`` (streamed to ``stream`` when given) and add the round to the history."""
        ids = self.prompt_ids(question)
        answer = _answer(self.model, self.processor, ids, self.image_inputs,
                         text_stop(self.template, self.processor.tokenizer), self.max_new_tokens, self.temperature,
                         stream)
        self.history += [("human", question), ("gpt", answer)]
        return answer
