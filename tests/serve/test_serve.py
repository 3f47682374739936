"""lora-llava serve, checked with the official openai client against a real server on 127.0.0.1: answers equal
`lora-llava chat`'s (plain and streamed), concurrent clients get their own answers, bad requests get the documented
status codes and the server keeps serving; the page is served with no external asset."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from lora_llava.infer.chat import chat  # noqa: E402
from lora_llava.serve import Engine, Limits  # noqa: E402
from lora_llava.serve.app import create_app  # noqa: E402

TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server in a thread, serving ``app``."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def _post(url: str, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def run16(trained_run):
    return trained_run(16)


@pytest.fixture(scope="module")
def cases(run16, shapes_data):
    """[(image path, question, lora-llava chat's greedy answer)] for six held-out images and two questions."""
    folder, _, eval_json = shapes_data
    records = json.loads(eval_json.read_text())[:6]
    out = []
    for k, r in enumerate(records):
        question = "What shape is in the image?" if k % 2 else "What colour is the shape?"
        answer = chat(run16.model, run16.processor, [("human", question)], image=folder / r["image"],
                      max_new_tokens=TOKENS)
        out.append((folder / r["image"], question, answer))
    assert any(a for _, _, a in out)
    return out


@pytest.fixture(scope="module")
def server(run16):
    engine = Engine(run16.model, run16.processor, "vicuna_v1", max_batch=8, batch_wait_s=0.2)
    context = run16.model.config.text_config.max_position_embeddings
    s = Server(create_app(engine, "tiny-llava", Limits(max_tokens=64, max_body_bytes=300_000),
                          info={"template": "vicuna_v1"}))
    s.engine, s.context = engine, context
    yield s
    s.stop()
    engine.close()


def _messages(image, question):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(image)}},
                                         {"type": "text", "text": question}]}]


def test_openai_client_gets_chats_answers(server, cases):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny-llava"]
    for image, question, expected in cases[:3]:
        reply = client.chat.completions.create(model="tiny-llava", messages=_messages(image, question),
                                               max_tokens=TOKENS)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny-llava", messages=_messages(image, question), max_tokens=TOKENS, stream=True) if c.choices]
        assert "".join(pieces) == expected and len([p for p in pieces if p]) > 1  # token by token


def test_multi_turn_and_text_only_follow_chat(server, run16, cases):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    image, question, first = cases[0]
    turns = [("human", question), ("gpt", first), ("human", "Are you sure?")]
    expected = chat(run16.model, run16.processor, turns, image=image, max_new_tokens=TOKENS)
    messages = _messages(image, question) + [{"role": "assistant", "content": first},
                                             {"role": "user", "content": "Are you sure?"}]
    assert client.chat.completions.create(model="m", messages=messages, max_tokens=TOKENS).choices[0] \
        .message.content == expected
    text_only = chat(run16.model, run16.processor, [("human", "Hello")], max_new_tokens=TOKENS)
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=TOKENS).choices[0].message.content == text_only


def test_concurrent_clients_each_get_their_own_answer(server, cases):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    jobs = [cases[k % len(cases)] for k in range(8)]
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(jobs))

    def ask(k):
        image, question, _ = jobs[k]
        barrier.wait()
        results[k] = client.chat.completions.create(model="m", messages=_messages(image, question),
                                                    max_tokens=TOKENS).choices[0].message.content

    before = len(server.engine.batches)
    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {k: jobs[k][2] for k in range(len(jobs))}
    sizes = server.engine.batches[before:]
    print("batch sizes:", sizes)
    assert sum(sizes) == len(jobs) and max(sizes) > 1  # answered in batches, each its own answer


def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, cases):
    url = server.url + "/v1/chat/completions"
    image, question, expected = cases[0]
    good = {"messages": _messages(image, question), "max_tokens": TOKENS}
    bad = [
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}, 400,
         "messages[0].role"),
        ({"messages": [{"role": "user", "content": _messages(image, question)[0]["content"] * 2}]}, 400,
         "messages[0].content[2]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}}]}]}, 400,
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "http://example.com/cat.png"}}]}]}, 400, "messages[0].content[0].image_url"),
        ({"messages": [{"role": "user", "content": "word " * server.context}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
        ({"messages": []}, 400, "messages"),
    ]
    for body, status, param in bad:
        code, reply = _post(url, body)
        assert (code, reply["error"]["param"]) == (status, param), (body, reply)
        assert reply["error"]["message"]
    assert _post(url, b"{not json")[0] == 400
    code, reply = _post(url, {"messages": [{"role": "user", "content": "x" * 400_000}]})
    assert code == 413 and "limit" in reply["error"]["message"]
    code, reply = _post(url, good)
    assert code == 200 and reply["choices"][0]["message"]["content"] == expected


def test_api_key_is_required_when_configured(run16, cases):
    engine = Engine(run16.model, run16.processor, "vicuna_v1")
    s = Server(create_app(engine, "keyed", Limits(max_tokens=16), api_key="s3cret-key"))
    try:
        url = s.url + "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        assert _post(url, body)[0] == 401
        assert _post(url, body, {"Authorization": "Bearer wrong"})[0] == 401
        assert _post(url, body, {"Authorization": "Bearer s3cret-key"})[0] == 200
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret-key")
        assert client.models.list().data[0].id == "keyed"
    finally:
        s.stop()
        engine.close()


def test_chat_page_is_served_with_no_external_assets(server):
    pages = {}
    for path in ("/", "/static/chat.js", "/static/chat.css"):
        with urllib.request.urlopen(server.url + path, timeout=10) as r:
            pages[path] = (r.headers["content-type"], r.read().decode())
    assert pages["/"][0].startswith("text/html") and "tiny-llava" in pages["/"][1]
    assert "vicuna_v1" in pages["/"][1] and 'src="/static/chat.js"' in pages["/"][1]
    assert pages["/static/chat.js"][0].startswith("text/javascript")
    assert not any(re.search(r"https?://", body) for _, body in pages.values())  # works offline


def test_cli_serve_answers_and_never_prints_the_key(run16, cases, tmp_path):
    port = _free_port()
    env = dict(os.environ, LLAVA_TEST_KEY="k-123456789", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lora_llava", "serve", str(run16.output_dir), "--port", str(port),
                             "--api-key-env", "LLAVA_TEST_KEY", "--max-new-tokens", "32"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123456789")
        image, question, expected = cases[1]
        reply = client.chat.completions.create(model="m", messages=_messages(image, question), max_tokens=TOKENS)
        assert reply.choices[0].message.content == expected
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "serving" in out and "127.0.0.1" in out and "k-123456789" not in out


def test_chat_page_in_a_real_browser(server, cases, tmp_path):
    """Headless Chromium (Debian's package, driven by Playwright; nothing downloaded) uploads an image, asks, and the
    answer on the page is lora-llava chat's. The screenshot is kept in the test's folder."""
    import shutil

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    playwright = pytest.importorskip("playwright.sync_api")
    if browser_path is None:
        if os.environ.get("LORA_LLAVA_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (CI installs Debian's package)")
        pytest.skip("chromium is not installed")
    image, question, expected = cases[2]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            failed = []
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto(server.url + "/")
            assert page.text_content("#model") == "tiny-llava" and page.text_content("#template") == "vicuna_v1"
            page.set_input_files("#image-input", str(image))
            page.wait_for_selector("#preview:not([hidden])")
            page.fill("#question", question)
            page.click("#send")
            page.wait_for_selector("li.assistant[data-done='true'], li.error[data-done='true']", timeout=60_000)
            assert page.locator("li.error").count() == 0, page.text_content("li.error")
            assert page.text_content("li.user") == question
            assert page.text_content("li.assistant") == expected
            page.screenshot(path=str(tmp_path / "chat-page.png"), full_page=True)
            # A follow-up question keeps the conversation; "New chat" clears it.
            page.fill("#question", "Are you sure?")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('li[data-done=\"true\"]').length == 2",
                                   timeout=60_000)
            assert page.locator("li.user").count() == 2
            page.click("#new-chat")
            assert page.locator("#messages li").count() == 0
            assert not failed
        finally:
            browser.close()
    assert (tmp_path / "chat-page.png").stat().st_size > 1000
    print("screenshot:", tmp_path / "chat-page.png")


def test_max_tokens_left_out_uses_what_the_context_leaves(server, run16):
    from lora_llava.serve import ChatRequest, RequestError

    ask = dict(turns=[("human", "Hello")], image=None, temperature=0.0, top_p=1.0, stop=[], stream=False)
    job = server.engine.prepare(ChatRequest(max_tokens=100_000, max_tokens_given=False, **ask), lambda ev: None)
    assert job.max_tokens == server.context - len(job.ids)
    with pytest.raises(RequestError, match="context is") as e:
        server.engine.prepare(ChatRequest(max_tokens=server.context, **ask), lambda ev: None)
    assert e.value.param == "max_tokens"
