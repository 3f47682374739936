"""A client of any OpenAI-compatible chat-completions endpoint (hosted APIs, vLLM, llama.cpp's server), standard
library only, with retries and exponential backoff on 429, 5xx, timeouts and dropped connections.

The API key is read by the caller from an environment variable and only ever goes into the ``Authorization``
header: no message, log line or error of this module contains it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
import urllib.error
import urllib.request
from typing import Any

from ..errors import LoraLlavaError, UsageError

__all__ = ["Reply", "Teacher", "TeacherError", "chat_url"]

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 529}


class TeacherError(LoraLlavaError):
    """A request that failed: ``retryable`` (429, 5xx, timeout: tried again), ``fatal`` (401, 403, 404: every other
    request would fail the same way, so a run stops)."""

    def __init__(self, message: str, retryable: bool = False, fatal: bool = False):
        super().__init__(message)
        self.retryable = retryable
        self.fatal = fatal


@dataclasses.dataclass
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int


def chat_url(url: str) -> str:
    """The chat-completions URL of a base URL: ``http://host:8000``, ``.../v1`` and the full path all work."""
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--teacher-url {url!r}: expected an http:// or https:// URL")
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/chat/completions"


@dataclasses.dataclass
class Teacher:
    url: str
    model: str
    api_key: str | None = dataclasses.field(default=None, repr=False)
    temperature: float = 1.0
    max_tokens: int = 1024
    timeout: float = 120.0
    retries: int = 6
    backoff: float = 1.0
    """Seconds before the first retry; doubled each time (with jitter), capped at 60, or the server's Retry-After."""

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = chat_url(self.url)  # http(s) only: checked there
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:  # noqa: S310 - the user's endpoint
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace").strip()
            if self.api_key:  # some APIs echo the key they got in their error message
                detail = detail.replace(self.api_key, "[API key]")
            retry_after = e.headers.get("Retry-After") if e.headers else None
            err = TeacherError(f"HTTP {e.code} from {chat_url(self.url)}: {detail}", e.code in _RETRY_STATUS,
                               fatal=e.code in (401, 403, 404))
            err.retry_after = retry_after  # type: ignore[attr-defined]
            raise err from None
        except TimeoutError as e:
            raise TeacherError(f"timed out after {self.timeout:g} s ({chat_url(self.url)})", True) from e
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TeacherError(f"cannot reach {chat_url(self.url)}: {reason}", True) from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise TeacherError(f"{chat_url(self.url)} answered with something that is not JSON: {raw[:120]!r}",
                               True) from None

    def chat(self, messages: list[dict[str, str]], seed: int | None = None) -> Reply:
        """The teacher's reply to ``messages``; retried on 429 / 5xx / timeouts / broken replies."""
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature,
                                   "max_tokens": self.max_tokens}
        if seed is not None:
            payload["seed"] = seed
        body = json.dumps(payload).encode()
        for attempt in range(1, self.retries + 2):
            try:
                data = self._post(body)
                choice = data["choices"][0]
                text = choice["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
                usage = data.get("usage") or {}
                return Reply(text, choice.get("finish_reason"), int(usage.get("prompt_tokens") or 0),
                             int(usage.get("completion_tokens") or 0), attempt)
            except (KeyError, IndexError, TypeError, ValueError) as e:
                if isinstance(e, TeacherError) and not e.retryable:
                    raise
                if attempt > self.retries:
                    raise TeacherError(f"gave up after {attempt} attempts: {e}") from None
                if not isinstance(e, TeacherError):
                    e = TeacherError(f"reply without choices[0].message.content ({type(e).__name__}: {e})", True)
                delay = min(60.0, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                retry_after = getattr(e, "retry_after", None)
                if retry_after:
                    try:
                        delay = min(60.0, float(retry_after))
                    except ValueError:
                        pass
                log.debug("attempt %d: %s; retrying in %.2f s", attempt, e, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")
