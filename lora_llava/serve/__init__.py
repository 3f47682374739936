"""``lora-llava serve``: an OpenAI-compatible chat-completions API and a browser chat page for a run or an export.

``protocol`` turns a request body into the turns and image training's prompt function takes (or a 400 naming the
field); ``engine`` owns the model in one thread and answers queued requests in batches, streaming each answer;
``app`` is the HTTP side (FastAPI, the optional ``serve`` extra).
"""

from .engine import Engine, Job
from .protocol import ChatRequest, Limits, RequestError, parse_chat_request

__all__ = ["ChatRequest", "Engine", "Job", "Limits", "RequestError", "parse_chat_request"]
