"""The OpenAI chat-completions request, checked and turned into what training's prompt function takes.

Accepted: ``messages`` of ``user`` / ``assistant`` turns (alternating, ending on ``user``), each ``content`` a string
or a list of ``text`` and ``image_url`` parts; at most one image (LLaVA-1.5 takes one), in the first user message, as
a ``data:`` URI (base64) or, when the operator named an ``--image-root``, a ``file://`` path under it. A ``system``
message is refused: the model was trained with its template's system prompt, and serving it another would feed it
a format it never saw. ``max_tokens`` (or ``max_completion_tokens``), ``temperature``, ``top_p``, ``stop`` (a string or
up to 4), ``stream``, ``n`` (1 only) and ``model`` are read; other fields are ignored.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ..data.images import to_rgb

__all__ = ["ChatRequest", "Limits", "RequestError", "parse_chat_request"]


class RequestError(Exception):
    """A request the server refuses: ``status`` (400, 401, 413, ...), a message naming the field, and the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_tokens: int = 512
    """Default and ceiling of ``max_tokens`` (the CLI's ``--max-new-tokens``)."""
    image_root: Path | None = None


@dataclasses.dataclass
class ChatRequest:
    turns: list[tuple[str, str]]
    image: Any  # a PIL image (RGB) or None
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool
    max_tokens_given: bool = True
    """False when the request left ``max_tokens`` out: the answer may then use whatever context is left."""


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"'{key}' must be a number from {low} to {high}; got {value!r}", key)
    return float(value)


def _decode_image(data: bytes, where: str, limits: Limits):
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise RequestError(f"{where}: the image is {len(data):,} bytes; the limit is {limits.max_image_bytes:,}", where)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > limits.max_image_pixels:
                raise RequestError(f"{where}: the image is {img.width}x{img.height} pixels; the limit is "
                                   f"{limits.max_image_pixels:,}", where)
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(f"{where}: the image cannot be decoded ({type(e).__name__})", where) from None


def _image(part: dict, where: str, limits: Limits):
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}.image_url.url: expected a data: URI or a file:// URL", f"{where}.image_url")
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header or not header[5:].startswith("image/"):
            raise RequestError(f"{where}.image_url.url: a data: URI must be 'data:image/...;base64,...'",
                               f"{where}.image_url")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise RequestError(f"{where}: the image is larger than {limits.max_image_bytes:,} bytes", where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}.image_url.url: the base64 data is not valid", f"{where}.image_url") from None
        return _decode_image(data, where, limits)
    if url.startswith("file://"):
        if limits.image_root is None:
            raise RequestError(f"{where}.image_url.url: file:// images are off (the server was started without "
                               "--image-root)", f"{where}.image_url")
        root = limits.image_root.resolve()
        path = Path(unquote(urlparse(url).path)).resolve()
        if not path.is_relative_to(root):
            raise RequestError(f"{where}.image_url.url: '{path}' is outside the image root", f"{where}.image_url")
        if not path.is_file():
            raise RequestError(f"{where}.image_url.url: '{path}' does not exist", f"{where}.image_url")
        return _decode_image(path.read_bytes(), where, limits)
    raise RequestError(f"{where}.image_url.url: only data: URIs (and file:// under --image-root) are accepted; the "
                       "server fetches nothing", f"{where}.image_url")


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Check ``body`` (the parsed JSON) and return what generation needs; :class:`RequestError` names the field."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    n = body.get("n", 1)
    if n != 1:
        raise RequestError(f"'n' must be 1; got {n!r}", "n")
    turns: list[tuple[str, str]] = []
    image = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", where)
        role = message.get("role")
        if role == "system":
            raise RequestError(f"{where}: system messages are not accepted; the model answers with the system prompt "
                               "of the template it was trained with", f"{where}.role")
        if role not in ("user", "assistant"):
            raise RequestError(f"{where}.role: unknown role {role!r} (expected user or assistant)", f"{where}.role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise RequestError(f"{where}.role: expected '{expected}' (turns alternate, starting with user)",
                               f"{where}.role")
        content = message.get("content")
        texts: list[str] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for k, part in enumerate(content):
                pwhere = f"{where}.content[{k}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    if image is not None or i > 0:
                        raise RequestError(f"{pwhere}: the model takes one image, in the first user message",
                                           pwhere)
                    image = _image(part, pwhere, limits)
                else:
                    raise RequestError(f"{pwhere}: expected a 'text' or 'image_url' part", pwhere)
        else:
            raise RequestError(f"{where}.content must be a string or a list of parts", f"{where}.content")
        text = "\n".join(texts)
        if "<image>" in text:
            raise RequestError(f"{where}.content: send the image as an image_url part, not an '<image>' tag",
                               f"{where}.content")
        turns.append(("human" if role == "user" else "gpt", text))
    if turns[-1][0] != "human":
        raise RequestError("the last message must be from the user", f"messages[{len(messages) - 1}].role")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    given = max_tokens is not None
    if not given:
        max_tokens = limits.max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limits.max_tokens:
        raise RequestError(f"'max_tokens' must be an integer from 1 to {limits.max_tokens}; got {max_tokens!r}",
                           "max_tokens")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    return ChatRequest(turns=turns, image=image, max_tokens=max_tokens,
                       temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
                       top_p=_number(body, "top_p", 1.0, 0.0, 1.0), stop=stops, stream=stream,
                       max_tokens_given=given)
