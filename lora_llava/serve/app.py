"""The HTTP side of ``lora-llava serve`` (FastAPI; ``pip install 'lora-llava[serve]'``). FastAPI reads the route
functions' annotations, so the names they use are imported at module level (this module is imported only to serve).

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream: true``), ``GET /v1/models``,
``GET /health``, and the chat page at ``/`` with its two assets under ``/static/``. Errors are OpenAI-style JSON
(``{"error": {"message", "type", "param", "code"}}``) with 400 (a bad field, named), 401 (a wrong or missing key
when one is configured), 413 (body too large) and 500 (generation failed); no request takes the server down.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .engine import Engine
from .protocol import Limits, RequestError, parse_chat_request

__all__ = ["create_app"]

_ASSETS = {"chat.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8"}


def _error(status: int, message: str, param: str | None = None):
    kind = {401: "authentication_error", 413: "invalid_request_error", 500: "server_error"}.get(
        status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


def create_app(engine: Engine, model_name: str, limits: Limits | None = None, api_key: str | None = None,
               info: dict[str, Any] | None = None):
    """The FastAPI app serving ``engine``. ``api_key``: required as ``Authorization: Bearer KEY`` on the API routes
    when set (compared in constant time; never logged). ``info``: shown by the page (template, path)."""
    limits = limits or Limits()
    app = FastAPI(title="lora-llava", docs_url=None, redoc_url=None, openapi_url=None)
    static = resources.files("lora_llava.serve").joinpath("static")

    def authorised(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models(request: Request):
        if not authorised(request):
            return _error(401, "a valid API key is required (Authorization: Bearer ...)")
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "lora-llava", **(info or {})}]}

    @app.get("/")
    async def page():
        html = static.joinpath("index.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", model_name).replace(
            "{{TEMPLATE}}", str((info or {}).get("template", ""))))

    @app.get("/static/{name}")
    async def asset(name: str):
        if name not in _ASSETS:
            return _error(404, f"no asset '{name}'")
        return Response(static.joinpath(name).read_bytes(), media_type=_ASSETS[name])

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        if not authorised(request):
            return _error(401, "a valid API key is required (Authorization: Bearer ...)")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return _error(413, f"the body is {int(declared):,} bytes; the limit is {limits.max_body_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                return _error(413, f"the body is over the {limits.max_body_bytes:,} byte limit")
        try:
            parsed = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body is not valid JSON")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            chat = await asyncio.to_thread(parse_chat_request, parsed, limits)
            job = await asyncio.to_thread(engine.prepare, chat, lambda ev: loop.call_soon_threadsafe(
                events.put_nowait, ev))
        except RequestError as e:
            return _error(e.status, e.message, e.param)
        engine.submit(job)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda n: {"prompt_tokens": len(job.ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(job.ids) + n}

        if not chat.stream:
            while True:
                event = await events.get()
                if event[0] == "error":
                    return _error(500, event[1])
                if event[0] == "done":
                    _, text, finish, n = event
                    return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": finish}], "usage": usage(n)}

        def chunk(delta: dict, finish: str | None = None, extra: dict | None = None) -> str:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **(extra or {})}
            return f"data: {json.dumps(data)}\n\n"

        async def sse():
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await events.get()
                if event[0] == "delta":
                    yield chunk({"content": event[1]})
                elif event[0] == "done":
                    yield chunk({}, event[2], {"usage": usage(event[3])})
                    break
                else:
                    yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
