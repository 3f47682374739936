"""Generation: batched greedy answers, streamed chat, LLaVA question files.

Every prompt is tokenized by :func:`~lora_llava.data.encode_prompt`, the function training uses (same template, same
image tokens), so a fine-tuned model is asked its questions in exactly the format it learned them in. Answers end at
EOS or at the template's stop string, and are cut and stripped the same way whether they are streamed or not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .data import IMAGE_TAG, DataError, ImageError, encode_prompt, get_template, load_image, resolve_image_path
from .data.images import CLIP_MEAN
from .modeling import ModelError, image_token_id, num_image_tokens

logger = logging.getLogger(__name__)

__all__ = ["ChatSession", "InferenceError", "chat", "generate_answers", "open_image", "read_questions",
           "with_image_tag"]


class InferenceError(ModelError):
    """A model folder that cannot be loaded for inference, or a conversation that cannot be asked; names the path."""


def _image_mean(processor) -> tuple[float, ...]:
    return tuple(getattr(processor.image_processor, "image_mean", None) or CLIP_MEAN)


def _placement(model) -> tuple[torch.device, torch.dtype]:
    """Where inputs go, and the dtype pixels are given in (the vision tower's)."""
    device = next(p.device for p in model.parameters())
    pixel_dtype = next((p.dtype for n, p in model.named_parameters() if "vision_tower" in n), torch.float32)
    return device, pixel_dtype


def _pixel_values(processor, images: list, model) -> torch.Tensor:
    device, dtype = _placement(model)
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixel_values.to(device, dtype)


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every prompt ends where generation starts."""
    longest = max(map(len, seqs))
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(seqs):
        input_ids[row, longest - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, longest - len(seq):] = 1
    return input_ids, mask


def _text_stop(tmpl, tokenizer) -> str | None:
    """The stop string to look for in the text; None when EOS is the stop (generation ends on it by itself)."""
    return tmpl.stop if tmpl.stop and tmpl.stop != tokenizer.eos_token else None


def _cut(text: str, stop: str | None) -> str:
    """The answer in decoded text: up to the stop string, without surrounding whitespace."""
    if stop:
        text = text.split(stop)[0]
    return text.strip()


def _stopping(tokenizer, stop: str | None, prompt_len: int):
    """Stopping criteria that end a row once its generated text holds ``stop`` (none when EOS is the stop)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    if not stop:
        return None

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [stop in tokenizer.decode(row[prompt_len:], skip_special_tokens=True) for row in input_ids]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


class _AnswerStreamer:
    """A ``generate()`` streamer that hands out answer text as it grows, exactly as the final answer will read.

    The text shown is always a prefix of the final (stripped, cut at the stop string) answer: trailing whitespace,
    a partial UTF-8 character and a partial stop string are held back until the next token settles them.
    """

    def __init__(self, tokenizer, stop: str | None, emit: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.emit = emit
        self.tokens: list[int] = []
        self.shown = ""
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stop and self.stop in text:
            self._show(_cut(text, self.stop))
            return
        if self.stop:
            for k in range(len(self.stop) - 1, 0, -1):
                if text.endswith(self.stop[:k]):
                    text = text[:-k]
                    break
        self._show(text.rstrip("\ufffd").strip())

    def end(self) -> None:
        self._show(self.answer)

    @property
    def answer(self) -> str:
        return _cut(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stop)

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.emit(text[len(self.shown):])
            self.shown = text


# --------------------------------------------------------------------------------------------------------------------
# Batched answers.


@torch.no_grad()
def generate_answers(model, processor, prompts: list[list[tuple[str, str]]], images: list[list[str]],
                     image_folder: str | None, template: str = "vicuna_v1", image_aspect_ratio: str = "pad",
                     max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Answer each conversation (ending on a human turn) greedily; returns the decoded answers.

    ``images[i]`` are the image paths (relative to ``image_folder``, which they cannot leave) of conversation ``i``;
    its turns carry one ``<image>`` tag per image. An answer ends at EOS or the template's stop string.
    """
    tmpl = get_template(template)
    tok = processor.tokenizer
    config = model.config
    img_id, n_img = image_token_id(config), num_image_tokens(config)
    pad_id = tok.pad_token_id
    mean = _image_mean(processor)
    device, _ = _placement(model)
    stop = _text_stop(tmpl, tok)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            ids = [encode_prompt(prompts[i], tok, tmpl, img_id, n_img) for i in chunk]
            input_ids, mask = _left_pad(ids, pad_id)
            kwargs = {}
            files = [f for i in chunk for f in images[i]]
            if files:
                pics = [load_image(image_folder, f, image_aspect_ratio, mean) for f in files]
                kwargs["pixel_values"] = _pixel_values(processor, pics, model)
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, use_cache=True, pad_token_id=pad_id, eos_token_id=tok.eos_token_id,
                stopping_criteria=_stopping(tok, stop, input_ids.shape[1]), **kwargs,
            )
            for row in out[:, input_ids.shape[1]:]:
                answers.append(_cut(tok.decode(row, skip_special_tokens=True), stop))
    finally:
        model.train(was_training)
    return answers


def read_questions(path: str | Path, image_folder: str | Path | None) -> list[dict[str, Any]]:
    """The records of a LLaVA evaluation question file (JSONL of ``{"question_id", "image", "text"}``), checked.

    Each record comes back with ``turns``: the one human turn to answer, ``<image>\\n`` put in front of the text when
    the record has an image and the text has no tag (as LLaVA's ``model_vqa`` does). Blank lines are skipped. Any
    problem raises :class:`DataError` naming the file and line: not a JSON object, no ``question_id`` or ``text``, an
    image that leaves ``image_folder`` or is not there, ``<image>`` tags that do not match the image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"questions file '{path}' does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with question_id, image and text, got "
                                f"{type(record).__name__}")
            if record.get("question_id") is None:
                raise DataError(f"{where}: no question_id")
            text = record.get("text")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: text: expected the question as a non-empty string, got {text!r}")
            image = record.get("image")
            if image is not None:
                if not isinstance(image, str) or not image.strip():
                    raise DataError(f"{where}: image: expected a path relative to the image folder, got {image!r}")
                try:
                    file = resolve_image_path(image_folder, image)
                except ImageError as e:
                    raise DataError(f"{where}: {e}") from None
                if not file.is_file():
                    raise DataError(f"{where}: image '{image}' not found (looked at '{file}')")
            try:
                turns = with_image_tag([("human", text)], image is not None)
            except InferenceError as e:
                raise DataError(f"{where}: text: {str(e).removeprefix('turn 1 ')}") from None
            records.append({"question_id": record["question_id"], "text": text, "image": image, "turns": turns,
                            "line": number})
    if not records:
        raise DataError(f"questions file '{path}' has no questions")
    return records


# --------------------------------------------------------------------------------------------------------------------
# Chat.


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
def _answer(model, processor, ids: list[int], pixel_values, stop: str | None, max_new_tokens: int,
            temperature: float, stream: Callable[[str], None] | None) -> str:
    tok = processor.tokenizer
    device, _ = _placement(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    streamer = _AnswerStreamer(tok, stop, stream or (lambda _text: None))
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    kwargs = {"pixel_values": pixel_values} if pixel_values is not None else {}
    was_training = model.training
    model.eval()
    try:
        model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            use_cache=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, streamer=streamer,
            stopping_criteria=_stopping(tok, stop, len(ids)), **sampling, **kwargs,
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
    pixel_values = None
    if image is not None:
        if isinstance(image, (str, Path)):
            image = open_image(image, image_aspect_ratio, _image_mean(processor))
        pixel_values = _pixel_values(processor, [image], model)
    ids = encode_prompt(with_image_tag(turns, image is not None), tok, tmpl, image_token_id(model.config),
                        num_image_tokens(model.config))
    return _answer(model, processor, ids, pixel_values, _text_stop(tmpl, tok), max_new_tokens, temperature, stream)


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
        self._pixel_values = None
        if self.template.name == "plain" and image is None:
            raise InferenceError("the plain template (a stage-1 run) only captions an image; give an image to chat "
                                 "about")
        if image is not None:
            if isinstance(image, (str, Path)):
                image = open_image(image, image_aspect_ratio, _image_mean(processor))
            self._pixel_values = _pixel_values(processor, [image], model)

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        self.history = []

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the prompt that asks ``question`` after the history (oldest rounds dropped to fit)."""
        tok, config = self.processor.tokenizer, self.model.config
        history = [] if self.template.name == "plain" else list(self.history)
        limit = _context_limit(self.model)
        while True:
            turns = with_image_tag([*history, ("human", question)], self._pixel_values is not None)
            ids = encode_prompt(turns, tok, self.template, image_token_id(config), num_image_tokens(config))
            if limit is None or len(ids) + self.max_new_tokens <= limit or not history:
                break
            history = history[2:]
        if limit is not None and len(ids) >= limit:
            raise InferenceError(f"the question makes a prompt of {len(ids)} tokens; the model takes {limit}")
        return ids

    def ask(self, question: str, stream: Callable[[str], None] | None = None) -> str:
        """Answer ``question`` (streamed to ``stream`` when given) and add the round to the history."""
        ids = self.prompt_ids(question)
        answer = _answer(self.model, self.processor, ids, self._pixel_values,
                         _text_stop(self.template, self.processor.tokenizer), self.max_new_tokens, self.temperature,
                         stream)
        self.history += [("human", question), ("gpt", answer)]
        return answer
