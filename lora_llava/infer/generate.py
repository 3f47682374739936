"""Generation: batched greedy answers, and the pieces every answer goes through (pixels, stop strings, streaming).

Every prompt is tokenized by :func:`~lora_llava.data.encode_prompt`, the function training uses (same template, same
image tokens), so a fine-tuned model is asked its questions in exactly the format it learned them in. Answers end at
EOS or at the template's stop string, and are cut and stripped the same way whether they are streamed or not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..data import encode_prompt, get_template, load_image
from ..llava.constants import CLIP_MEAN
from ..llava.spec import config_image_token_id, image_token_counts, is_next_config

logger = logging.getLogger(__name__)

__all__ = ["AnswerStreamer", "cut_answer", "generate_answers", "image_aspect", "image_inputs", "image_mean",
           "image_tokens_of", "left_pad", "placement", "prepare_pixels", "stopping_criteria", "text_stop"]


def image_mean(processor) -> tuple[float, ...]:
    return tuple(getattr(processor.image_processor, "image_mean", None) or CLIP_MEAN)


def placement(model) -> tuple[torch.device, torch.dtype]:
    """Where inputs go, and the dtype pixels are given in (the vision tower's)."""
    device = next(p.device for p in model.parameters())
    pixel_dtype = next((p.dtype for n, p in model.named_parameters() if "vision_tower" in n), torch.float32)
    return device, pixel_dtype


def prepare_pixels(processor, images: list, model) -> torch.Tensor:
    return image_inputs(processor, images, model)["pixel_values"]


def image_inputs(processor, images: list, model) -> dict[str, torch.Tensor]:
    """What ``generate`` takes for ``images``: ``pixel_values``, and for a LLaVA-NeXT model ``image_sizes`` (the model
    un-pads each image's grid features by its size)."""
    device, dtype = placement(model)
    out = processor.image_processor(images=images, return_tensors="pt")
    kwargs = {"pixel_values": out["pixel_values"].to(device, dtype)}
    if "image_sizes" in out:
        kwargs["image_sizes"] = torch.as_tensor(out["image_sizes"]).to(device)
    return kwargs


def image_aspect(config, aspect: str) -> str:
    """How images are opened for a model: a LLaVA-NeXT model (AnyRes) takes the image as it is (``anyres``: never
    padded to a square; its processor fits it into a grid), a LLaVA-1.5 one as training's ``image_aspect_ratio``."""
    return "anyres" if is_next_config(config) else aspect


def image_tokens_of(config, images: list) -> int | list[int]:
    """Image tokens of each (PIL) image for the model ``config``, as :func:`~lora_llava.data.encode_prompt` takes
    them: one count (LLaVA-1.5) or one per image from its size (LLaVA-NeXT)."""
    return image_token_counts(config, [(im.height, im.width) for im in images])


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so every prompt ends where generation starts."""
    longest = max(map(len, seqs))
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(seqs):
        input_ids[row, longest - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, longest - len(seq):] = 1
    return input_ids, mask


def text_stop(tmpl, tokenizer) -> str | None:
    """The stop string to look for in the text; None when EOS is the stop (generation ends on it by itself)."""
    return tmpl.stop if tmpl.stop and tmpl.stop != tokenizer.eos_token else None


def cut_answer(text: str, stop: str | None) -> str:
    """The answer in decoded text: up to the stop string, without surrounding whitespace."""
    if stop:
        text = text.split(stop)[0]
    return text.strip()


def stopping_criteria(tokenizer, stop: str | None, prompt_len: int):
    """Stopping criteria that end a row once its generated text holds ``stop`` (none when EOS is the stop)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    if not stop:
        return None

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [stop in tokenizer.decode(row[prompt_len:], skip_special_tokens=True) for row in input_ids]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


class AnswerStreamer:
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
            self._show(cut_answer(text, self.stop))
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
        return cut_answer(self.tokenizer.decode(self.tokens, skip_special_tokens=True), self.stop)

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.emit(text[len(self.shown):])
            self.shown = text




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
    img_id = config_image_token_id(config)
    aspect = image_aspect(config, image_aspect_ratio)
    pad_id = tok.pad_token_id
    mean = image_mean(processor)
    device, _ = placement(model)
    stop = text_stop(tmpl, tok)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            pics = {i: [load_image(image_folder, f, aspect, mean) for f in images[i]] for i in chunk}
            ids = [encode_prompt(prompts[i], tok, tmpl, img_id, image_tokens_of(config, pics[i])) for i in chunk]
            input_ids, mask = left_pad(ids, pad_id)
            kwargs = {}
            flat = [p for i in chunk for p in pics[i]]
            if flat:
                kwargs = image_inputs(processor, flat, model)
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, use_cache=True, pad_token_id=pad_id, eos_token_id=tok.eos_token_id,
                stopping_criteria=stopping_criteria(tok, stop, input_ids.shape[1]), **kwargs,
            )
            for row in out[:, input_ids.shape[1]:]:
                answers.append(cut_answer(tok.decode(row, skip_special_tokens=True), stop))
    finally:
        model.train(was_training)
    return answers
