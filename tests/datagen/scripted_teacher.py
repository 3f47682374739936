"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol with scripted replies.

The reply to a request depends only on its messages (so any concurrency gives the same records): the kind is told
from the system message, and the first caption of the image's context picks the script. A caption containing
``#500x2`` fails twice with HTTP 500 before answering, ``#429x1`` once with 429, ``#malformed`` always gets a reply
with no labels, ``#unpaired`` a question without an answer, ``#bad-json`` a body that is not JSON the first time.
``replies`` maps a first caption to a fixed reply text; with ``key``, a request without ``Bearer <key>`` gets 401;
with ``no_system``, a request with a system message gets 400.
Every request is kept in ``requests``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def kind_of(system: str) -> str:
    if "Describe the image in detail" in system:
        return "detail"
    if "Ask one plausible question" in system:
        return "reasoning"
    return "conversation"


def default_reply(kind: str, caption: str) -> str:
    if kind == "detail":
        return f"A detailed description: {caption} The scene is calm and well lit."
    if kind == "reasoning":
        return (f"Question:\nWhy is this happening: {caption}?\n===\nAnswer:\n"
                f"Because of {caption.lower()}, step by step.")
    return (f"Question:\nWhat is shown?\n===\nAnswer:\n{caption}\n===\n"
            f"Question:\nHow many captions mention it?\n===\nAnswer:\nOne of them: {caption}\n===")


class ScriptedTeacher:
    def __init__(self, replies: dict[str, str] | None = None, delay: float = 0.0, port: int = 0,
                 key: str | None = None, no_system: bool = False):
        self.replies = replies or {}
        self.no_system = no_system
        self.key = key
        self.delay = delay
        self.requests: list[dict] = []
        self.seen: Counter = Counter()
        self.lock = threading.Lock()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                teacher.handle(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _send(self, handler, status: int, payload: bytes, headers: dict | None = None):
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(payload)

    def handle(self, handler, body: dict):
        messages = body["messages"]
        kind = kind_of(messages[0]["content"])
        caption = messages[-1]["content"].splitlines()[0]
        key = (kind, messages[-1]["content"])
        with self.lock:
            self.requests.append({"path": handler.path, "auth": handler.headers.get("Authorization"), "body": body})
            self.seen[key] += 1
            n = self.seen[key]
        if self.key and handler.headers.get("Authorization") != f"Bearer {self.key}":
            # Like some hosted APIs, the error echoes the key it got: the client must not print it.
            got = json.dumps(handler.headers.get("Authorization"))
            return self._send(handler, 401, f'{{"error": {{"message": "invalid api key {got}"}}}}'.encode())
        if self.no_system and messages[0]["role"] == "system":  # as `lora-llava serve` does
            return self._send(handler, 400, b'{"error": {"message": "system messages are not accepted"}}')
        if self.delay:
            time.sleep(self.delay)
        for code in (500, 429):
            tag = f"#{code}x"
            if tag in caption:
                times = int(caption.split(tag)[1][0])
                if n <= times:
                    extra = {"Retry-After": "0"} if code == 429 else {}
                    return self._send(handler, code, b'{"error": {"message": "scripted failure"}}', extra)
        if "#bad-json" in caption and n == 1:
            return self._send(handler, 200, b"<html>not json</html>")
        if "#malformed" in caption:
            text = "I see a picture. It is nice."
        elif "#unpaired" in caption and kind != "detail":
            text = "Question:\nWhat is it?\n===\nQuestion:\nAnd this?\n===\nAnswer:\nNothing."
        else:
            text = self.replies.get(caption) or default_reply(kind, caption)
        reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": len(json.dumps(messages)) // 4, "completion_tokens": len(text) // 4}}
        return self._send(handler, 200, json.dumps(reply).encode())


if __name__ == "__main__":  # python tests/datagen/scripted_teacher.py PORT [DELAY]: serve until killed
    import sys

    with ScriptedTeacher(delay=float(sys.argv[2]) if len(sys.argv) > 2 else 0.0, port=int(sys.argv[1])) as t:
        print(t.url, flush=True)
        t.thread.join()
