"""Sample -> ``input_ids`` / ``labels`` the way LLaVA-1.5 trains on them.

As in the reference, the prompt string is tokenized as whole pieces between ``<image>`` tags (BOS once, at the very
start), and each tag becomes the model's image token repeated once per image feature (576 for CLIP-L/336); with a
tokenizer that has ``<im_start>`` / ``<im_end>`` (LLaVA v1) those tokens wrap each image's tokens.
Labels come from character offsets: a token is supervised when it overlaps an answer segment of the template (the
answer and the separator that closes it). Everything else, BOS, system, questions, role headers, image tokens, is
-100. A sample with no supervised token left is an error (or a counted skip), never silently trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..llava.constants import IGNORE_INDEX
from ..llava.tokenizer import encode_like_sentencepiece, image_wrap_ids
from .sources import Sample
from .templates import IMAGE_TAG, Template

__all__ = ["Encoded", "ImageTokens", "SampleTooLong", "encode_prompt", "encode_sample"]


class SampleTooLong(ValueError):
    """A sample that cannot fit ``max_length`` without cutting image tokens or every supervised token."""


@dataclasses.dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


ImageTokens = int | Sequence[int]
"""Image tokens per image: one count for all (LLaVA-1.5: 576), or one count per image in order (AnyRes: each image's
count depends on its size, see :mod:`lora_llava.llava.anyres`)."""


def _per_image(num_image_tokens: ImageTokens, images: int) -> list[int]:
    if isinstance(num_image_tokens, int):
        return [num_image_tokens] * images
    counts = list(num_image_tokens)
    if len(counts) != images:
        raise ValueError(f"{images} <image> tags in the text but image token counts for {len(counts)} images")
    return counts


def _encode_segments(tokenizer, segments: list[tuple[str, bool]], image_token_id: int,
                     num_image_tokens: ImageTokens) -> tuple[list[int], list[int]]:
    text = "".join(t for t, _ in segments)
    spans = []
    pos = 0
    for t, supervised in segments:
        if supervised:
            spans.append((pos, pos + len(t)))
        pos += len(t)

    ids: list[int] = []
    labels: list[int] = []
    offset = 0
    chunks = text.split(IMAGE_TAG)
    counts = _per_image(num_image_tokens, len(chunks) - 1)
    wrap = image_wrap_ids(tokenizer)
    for k, chunk in enumerate(chunks):
        if k > 0:
            image = [image_token_id] * counts[k - 1]
            if wrap is not None:
                image = [wrap[0], *image, wrap[1]]
            ids += image
            labels += [IGNORE_INDEX] * len(image)
            offset += len(IMAGE_TAG)
        enc = encode_like_sentencepiece(tokenizer, chunk, add_special_tokens=(k == 0))
        for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            start, end = start + offset, end + offset
            # A token is supervised when it overlaps an answer span; a zero-width one (the "▁" SentencePiece puts at
            # the start of a piece) when it sits inside one. BOS sits at 0, before any answer.
            if end > start:
                sup = any(start < s_end and end > s_start for s_start, s_end in spans)
            else:
                sup = any(s_start <= start < s_end for s_start, s_end in spans)
            ids.append(tid)
            labels.append(tid if sup else IGNORE_INDEX)
        offset += len(chunk)
    return ids, labels


def encode_sample(sample: Sample, tokenizer, template: Template, image_token_id: int, num_image_tokens: ImageTokens,
                  max_length: int | None = None) -> Encoded:
    """Token ids and labels of a sample; raises ValueError when nothing would be supervised.

    Over ``max_length``, the sample is cut at the end only when the cut falls after its last image token and leaves
    at least one supervised token; otherwise :class:`SampleTooLong` is raised (the caller drops and counts it).
    """
    segments = template.render(sample.turns)
    ids, labels = _encode_segments(tokenizer, segments, image_token_id, num_image_tokens)
    if all(lab == IGNORE_INDEX for lab in labels):
        raise ValueError(f"{sample.where or sample.id}: no token of the answers is supervised")
    truncated = False
    if max_length is not None and len(ids) > max_length:
        image_ids = {image_token_id, *(image_wrap_ids(tokenizer) or ())}
        last_image = max((i for i, t in enumerate(ids) if t in image_ids), default=-1)
        if last_image >= max_length or all(lab == IGNORE_INDEX for lab in labels[:max_length]):
            raise SampleTooLong(
                f"{sample.where or sample.id}: {len(ids)} tokens > data.max_length {max_length}, and cutting would "
                + ("split image tokens" if last_image >= max_length else "leave no supervised token")
            )
        ids, labels, truncated = ids[:max_length], labels[:max_length], True
    return Encoded(ids, labels, truncated)


def encode_prompt(turns: list[tuple[str, str]], tokenizer, template: Template, image_token_id: int,
                  num_image_tokens: ImageTokens) -> list[int]:
    """Token ids of a generation prompt (conversation ending on a human turn), tokenized exactly as in training."""
    segments = template.render(turns, add_generation_prompt=True)
    ids, _ = _encode_segments(tokenizer, segments, image_token_id, num_image_tokens)
    return ids
