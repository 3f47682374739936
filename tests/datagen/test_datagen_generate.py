"""``data generate`` against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/datagen/scripted_teacher.py):
records of every kind, retries after 500 / 429 / broken bodies / timeouts, rejects with reasons, resume after
SIGKILL, concurrency 8 == 1, the key never printed, COCO and JSONL inputs, custom prompts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from scripted_teacher import ScriptedTeacher, default_reply

from lora_llava.cli.main import main
from lora_llava.datagen.annotations import read_annotations
from lora_llava.datagen.generate import generate, make_jobs
from lora_llava.datagen.prompts import DETAIL_INSTRUCTIONS, KINDS, load_prompts
from lora_llava.datagen.teacher import Teacher, TeacherError
from lora_llava.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-test-0123456789-do-not-print"


def make_images(folder: Path, captions: list[str]) -> Path:
    """A JSONL annotation file of one tiny image per caption (plus a second caption and one box each)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, cap in enumerate(captions):
        Image.new("RGB", (8, 8), (i * 7 % 256, 0, 0)).save(folder / "images" / f"im{i:03d}.png")
        lines.append(json.dumps({"image": f"im{i:03d}.png", "captions": [cap, f"Another view of picture {i}."],
                                 "boxes": [{"label": "cube", "bbox": [0.1, 0.2, 0.55, 0.6]}]}))
    path = folder / "ann.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def run_cli(ann: Path, out: Path, url: str, *extra: str, env: dict | None = None, **kw):
    cmd = [sys.executable, "-m", "lora_llava", "-v", "data", "generate", str(ann), "--image-folder",
           str(ann.parent / "images"), "--out", str(out), "--teacher-url", url, "--teacher-model", "teacher",
           "--backoff", "0.01", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MY_TEACHER_KEY": KEY, **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, **kw)


def test_generate_every_kind_with_retries_and_rejects_and_the_key_never_printed(tmp_path):
    captions = ["A red cube on a table.", "A dog runs #500x2 in a park.", "A cat sleeps #429x1 on a sofa.",
                "A car #bad-json in the rain.", "A #malformed reply.", "A bird #unpaired on a wire."]
    ann = make_images(tmp_path, captions)
    out = tmp_path / "out.jsonl"
    with ScriptedTeacher(key=KEY) as t:
        r = run_cli(ann, out, t.url, "--api-key-env", "MY_TEACHER_KEY", "--concurrency", "3")
        requests = list(t.requests)
        seen = dict(t.seen)
    assert r.returncode == 0, r.stderr
    assert KEY not in r.stdout + r.stderr  # with -v: debug logs of every retry included
    assert "HTTP 500" in r.stderr and "HTTP 429" in r.stderr  # the retries were logged (without the key)
    assert all(q["auth"] == f"Bearer {KEY}" for q in requests) and requests[0]["path"] == "/v1/chat/completions"
    # 500 twice then an answer: three requests for each kind of that image; 429 once: two; a broken body once: two.
    dog = {k: n for (k, ctx), n in seen.items() if "#500x2" in ctx}
    assert dog == {"conversation": 3, "detail": 3, "reasoning": 3}
    assert {n for (_, ctx), n in seen.items() if "#429x1" in ctx or "#bad-json" in ctx} == {2}

    records = {r["id"]: r for r in lines(out)}
    rejects = {r["id"]: r for r in lines(tmp_path / "out.jsonl.rejects.jsonl")}
    # "#malformed": no labels for conversation and reasoning (rejected), a usable plain description for detail.
    assert {k: v["reason"] for k, v in rejects.items()} == {
        "im004.png:conversation": "no_labels", "im004.png:reasoning": "no_labels",
        "im005.png:conversation": "unpaired", "im005.png:reasoning": "unpaired"}
    assert rejects["im005.png:reasoning"]["reply"].startswith("Question:\nWhat is it?")
    assert len(records) == 6 * 3 - 4
    assert "rejected    4 (no_labels 2, unpaired 2)" in r.stdout and "written     14 records" in r.stdout
    assert "requested   18" in r.stdout and "tokens      " in r.stdout

    # Record by record: the image before or after the first question, the teacher's text in the turns.
    for i, cap in enumerate(captions[:4]):
        conv = records[f"im{i:03d}.png:conversation"]
        assert conv["image"] == f"im{i:03d}.png"
        first = conv["conversations"][0]["value"]
        assert first in ("<image>\nWhat is shown?", "What is shown?\n<image>")
        assert [t["value"] for t in conv["conversations"][1:]] == [cap, "How many captions mention it?",
                                                                   f"One of them: {cap}"]
        detail = records[f"im{i:03d}.png:detail"]["conversations"]
        assert detail[0]["value"].replace("<image>", "").strip() in DETAIL_INSTRUCTIONS
        assert detail[1]["value"] == default_reply("detail", cap)
        reason = records[f"im{i:03d}.png:reasoning"]["conversations"]
        assert len(reason) == 2 and reason[1]["value"].startswith("Because of")
    firsts = [r["conversations"][0]["value"] for r in records.values()]
    assert any(f.startswith("<image>\n") for f in firsts) and any(f.endswith("\n<image>") for f in firsts)

    # What the teacher was sent: system, few-shot pairs as user/assistant turns, then the context; boxes only for
    # detail and reasoning.
    prompts = load_prompts(None)
    for q in requests:
        messages = q["body"]["messages"]
        kind = next(k for k in KINDS if messages[0]["content"] == prompts[k].system)
        assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(prompts[kind].examples) + \
            ["user"]
        assert ("cube: [0.100, 0.200, 0.550, 0.600]" in messages[-1]["content"]) == (kind != "conversation")

    # A rerun asks for nothing: every record is in OUT or in the rejects file.
    with ScriptedTeacher(key=KEY) as t:
        r2 = run_cli(ann, out, t.url, "--api-key-env", "MY_TEACHER_KEY")
        assert r2.returncode == 0 and t.requests == []
    assert "18 done by an earlier run" in r2.stdout and lines(out) == list(records.values())


def test_the_output_passes_data_check(tmp_path):
    from lora_llava.data.check import check_data

    ann = make_images(tmp_path, ["A red cube on a table.", "Two dogs on the grass."])
    with ScriptedTeacher() as t:
        s = generate(make_jobs(read_annotations([ann]), KINDS), load_prompts(None), Teacher(t.url, "m"),
                     tmp_path / "out.jsonl", progress=False)
    assert s.written == 6
    report = check_data([tmp_path / "out.jsonl"], tmp_path / "images", decode_images=True, progress=None)
    assert report.ok, report.format()


def test_concurrency_8_gives_the_records_of_concurrency_1(tmp_path):
    ann = make_images(tmp_path, [f"Picture {i} shows {i % 4} apples #{'500x1' if i % 5 == 0 else 'ok'}."
                                 for i in range(20)])
    jobs = make_jobs(read_annotations([ann]), KINDS)
    results = {}
    with ScriptedTeacher(delay=0.01) as t:
        for n in (1, 8):
            s = generate(jobs, load_prompts(None), Teacher(t.url, "m", backoff=0.01), tmp_path / f"c{n}.jsonl",
                         concurrency=n, seed=3, progress=False)
            assert s.written == 60 and s.failed == 0
            results[n] = (tmp_path / f"c{n}.jsonl").read_text().splitlines()
    assert sorted(results[1]) == sorted(results[8])
    assert len(set(results[8])) == 60


def test_resume_after_sigkill_loses_nothing_and_duplicates_nothing(tmp_path):
    ann = make_images(tmp_path, [f"Scene number {i} with {i % 3} boats." for i in range(40)])
    ref = tmp_path / "ref.jsonl"
    with ScriptedTeacher() as t:
        generate(make_jobs(read_annotations([ann]), KINDS), load_prompts(None), Teacher(t.url, "m"), ref,
                 progress=False, seed=7)
    out = tmp_path / "out.jsonl"
    with ScriptedTeacher(delay=0.03) as t:
        cmd = [sys.executable, "-m", "lora_llava", "data", "generate", str(ann), "--image-folder",
               str(tmp_path / "images"), "--out", str(out), "--teacher-url", t.url, "--teacher-model", "m",
               "--concurrency", "4", "--seed", "7", "--no-progress"]
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(lines(out)) < 20:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
    done_at_kill = len(lines(out))
    assert 20 <= done_at_kill < 120, done_at_kill  # killed mid-run
    # A kill in the middle of a write leaves a torn last line: the next run cuts it and asks for that record again.
    with open(out, "ab") as f:
        f.write(b'{"id": "im039.png:detail", "image": "im0')
    with ScriptedTeacher() as t:
        r = run_cli(ann, out, t.url, "--seed", "7", "--concurrency", "4")
        asked = len(t.requests)
    assert r.returncode == 0, r.stderr
    assert asked == 120 - done_at_kill
    got = out.read_text().splitlines()
    assert len(got) == len(set(got)) == 120
    assert sorted(got) == sorted(ref.read_text().splitlines())
    assert "incomplete last line" in r.stderr


def test_a_bad_key_stops_the_run_and_is_not_printed(tmp_path):
    ann = make_images(tmp_path, ["A red cube."])
    with ScriptedTeacher(key="the-right-key") as t:
        r = run_cli(ann, tmp_path / "out.jsonl", t.url, "--api-key-env", "MY_TEACHER_KEY")
        assert len(t.requests) <= 3  # no retries of a 401
    assert r.returncode == 1 and "HTTP 401" in r.stderr and "invalid api key" in r.stderr
    assert "[API key]" in r.stderr  # the server echoed the key: redacted
    assert KEY not in r.stdout + r.stderr
    r = run_cli(ann, tmp_path / "out.jsonl", "http://127.0.0.1:9/v1", "--api-key-env", "UNSET_VAR_FOR_TEST")
    assert r.returncode == 2 and "UNSET_VAR_FOR_TEST" in r.stderr


def test_failures_after_every_retry_are_counted_and_asked_again_next_run(tmp_path):
    ann = make_images(tmp_path, ["A cube #500x5 fails five times.", "A fine picture."])
    with ScriptedTeacher() as t:
        code = main(["data", "generate", str(ann), "--image-folder", str(tmp_path / "images"), "--out",
                     str(tmp_path / "o.jsonl"), "--teacher-url", t.url, "--teacher-model", "m", "--kind", "detail",
                     "--retries", "2", "--backoff", "0.01", "--no-progress"])
        assert code == 1  # one request failed after 3 attempts
        assert [r["id"] for r in lines(tmp_path / "o.jsonl")] == ["im001.png:detail"]
        code = main(["data", "generate", str(ann), "--image-folder", str(tmp_path / "images"), "--out",
                     str(tmp_path / "o.jsonl"), "--teacher-url", t.url, "--teacher-model", "m", "--kind", "detail",
                     "--retries", "2", "--backoff", "0.01", "--no-progress"])
        assert code == 0  # attempts 4-5 fail, the 6th answers
    assert sorted(r["id"] for r in lines(tmp_path / "o.jsonl")) == ["im000.png:detail", "im001.png:detail"]


def test_timeouts_are_retried_then_reported(tmp_path):
    with ScriptedTeacher(delay=0.5) as t:
        teacher = Teacher(t.url, "m", timeout=0.1, retries=1, backoff=0.01)
        with pytest.raises(TeacherError, match="gave up after 2 attempts: timed out"):
            teacher.chat([{"role": "user", "content": "hello"}])
        assert len(t.requests) == 2


def test_coco_annotations_become_normalised_boxes(tmp_path):
    images = [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
              {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50}]
    caps = {"images": images, "annotations": [
        {"id": 1, "image_id": 1, "caption": "A man on a horse."}, {"id": 2, "image_id": 1, "caption": " A rider. "},
        {"id": 3, "image_id": 2, "caption": "A plate."}]}
    inst = {"images": images, "categories": [{"id": 19, "name": "horse"}, {"id": 1, "name": "person"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 19, "bbox": [20, 10, 100, 80]},
                            {"id": 8, "image_id": 1, "category_id": 1, "bbox": [50.5, 0, 33.3, 40]}]}
    (tmp_path / "captions_x.json").write_text(json.dumps(caps))
    (tmp_path / "instances_x.json").write_text(json.dumps(inst))
    a, b = read_annotations([tmp_path / "captions_x.json", tmp_path / "instances_x.json"])
    assert a.image == "a.jpg" and a.captions == ["A man on a horse.", "A rider."]
    assert [(x.label, x.bbox) for x in a.boxes] == [("horse", (0.1, 0.1, 0.6, 0.9)),
                                                    ("person", (0.253, 0.0, 0.419, 0.4))]
    assert b.image == "b.jpg" and b.boxes == []
    from lora_llava.datagen.prompts import context_of
    assert context_of(a, "detail") == ("A man on a horse.\nA rider.\nhorse: [0.100, 0.100, 0.600, 0.900]\n"
                                       "person: [0.253, 0.000, 0.419, 0.400]")
    assert context_of(a, "conversation") == "A man on a horse.\nA rider."


@pytest.mark.parametrize(("line", "message"), [
    ('{"image": "a.jpg"}', "line 2: field 'captions' must be a non-empty list"),
    ('{"captions": ["x"]}', "line 2: field 'image' must be a non-empty path string"),
    ('{"image": "a.jpg", "captions": ["x"], "boxes": [{"label": "dog", "bbox": [10, 20, 30, 40]}]}',
     "line 2: boxes[0]: 'bbox' [10, 20, 30, 40] is not normalised to 0-1"),
    ('{"image": "a.jpg", "captions": ["x"], "boxes": [{"bbox": [0, 0, 1, 1]}]}', "line 2: boxes[0]: expected"),
    ('{"image": "a.jpg", "captions": ["x"], "boxes": [{"label": "d", "bbox": [0.5, 0, 0.2, 1]}]}',
     "x1 <= x2"),
    ("{not json", "line 2 is not valid JSON"),
])
def test_bad_annotations_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "ann.jsonl"
    path.write_text('{"image": "ok.jpg", "captions": ["fine"]}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_annotations([path])
    assert str(path) in str(e.value) and message in str(e.value)


def test_custom_prompts_folder_is_what_the_teacher_gets(tmp_path):
    prompts = tmp_path / "prompts" / "detail"
    prompts.mkdir(parents=True)
    (prompts / "system.txt").write_text("You describe pictures. Describe the image in detail, please.\n")
    (prompts / "000_context.txt").write_text("A cup.")
    (prompts / "000_output.txt").write_text("A white cup stands alone.")
    (prompts / "001_context.txt").write_text("A pen.")
    (prompts / "001_output.txt").write_text("A blue pen lies flat.")
    ann = make_images(tmp_path, ["A red cube."])
    with ScriptedTeacher() as t:
        assert main(["data", "generate", str(ann), "--image-folder", str(tmp_path / "images"), "--out",
                     str(tmp_path / "o.jsonl"), "--teacher-url", t.url, "--teacher-model", "m", "--kind", "detail",
                     "--prompts", str(tmp_path / "prompts"), "--no-progress"]) == 0
        (request,) = t.requests
    assert request["body"]["messages"] == [
        {"role": "system", "content": "You describe pictures. Describe the image in detail, please."},
        {"role": "user", "content": "A cup."}, {"role": "assistant", "content": "A white cup stands alone."},
        {"role": "user", "content": "A pen."}, {"role": "assistant", "content": "A blue pen lies flat."},
        {"role": "user", "content": "A red cube.\nAnother view of picture 0.\ncube: [0.100, 0.200, 0.550, 0.600]"}]
    # A prompt folder without the kind's system message is a usage error naming the file.
    assert main(["data", "generate", str(ann), "--image-folder", str(tmp_path / "images"), "--out",
                 str(tmp_path / "o2.jsonl"), "--teacher-url", t.url, "--teacher-model", "m", "--kind", "reasoning",
                 "--prompts", str(tmp_path / "prompts")]) == 2


def test_missing_images_are_named(tmp_path, capsys):
    ann = make_images(tmp_path, ["A red cube.", "A blue ball."])
    (tmp_path / "images" / "im001.png").unlink()
    assert main(["data", "generate", str(ann), "--image-folder", str(tmp_path / "images"), "--out",
                 str(tmp_path / "o.jsonl"), "--teacher-url", "http://127.0.0.1:9", "--teacher-model", "m"]) == 1
    assert "1 annotated image(s) not found" in capsys.readouterr().err
    assert main(["data", "generate", str(ann), "--image-folder", str(tmp_path / "images"), "--out",
                 str(tmp_path / "o.json"), "--teacher-url", "http://127.0.0.1:9", "--teacher-model", "m"]) == 2
    assert "name the file *.jsonl" in capsys.readouterr().err
    # --limit 1: only the first image is asked for (and needs to exist).
    with ScriptedTeacher() as t:
        assert main(["data", "generate", str(ann), "--image-folder", str(tmp_path / "images"), "--out",
                     str(tmp_path / "o.jsonl"), "--teacher-url", t.url, "--teacher-model", "m", "--limit", "1",
                     "--kind", "conversation", "--no-progress"]) == 0
        assert len(t.requests) == 1
    assert [r["id"] for r in lines(tmp_path / "o.jsonl")] == ["im000.png:conversation"]


def test_generate_and_mix_import_no_torch(tmp_path):
    ann = make_images(tmp_path, ["A red cube."])
    (tmp_path / "s.yaml").write_text("sources:\n  - {format: llava, path: o.jsonl}\n")
    probe = ("import sys, json; from lora_llava.cli.main import main; code = main(sys.argv[1:]); "
             "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}))")
    with ScriptedTeacher() as t:
        for args in (["data", "generate", str(ann), "--image-folder", str(tmp_path / "images"), "--out",
                      str(tmp_path / "o.jsonl"), "--teacher-url", t.url, "--teacher-model", "m", "--no-progress"],
                     ["data", "mix", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "m.json")]):
            r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert json.loads(r.stdout.strip().splitlines()[-1]) == {"code": 0, "torch": False}, r.stderr


def test_ctrl_c_stops_at_once_with_requests_in_flight(tmp_path):
    ann = make_images(tmp_path, ["A red cube.", "A blue ball."])
    with ScriptedTeacher(delay=20) as t:
        cmd = [sys.executable, "-m", "lora_llava", "data", "generate", str(ann), "--image-folder",
               str(tmp_path / "images"), "--out", str(tmp_path / "o.jsonl"), "--teacher-url", t.url,
               "--teacher-model", "m", "--no-progress"]
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not t.requests:
            time.sleep(0.02)
        assert t.requests
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = proc.communicate(timeout=15)
        assert time.monotonic() - start < 5  # not waiting for the 20 s replies
    assert proc.returncode == 130 and "interrupted" in err
    assert lines(tmp_path / "o.jsonl") == []


def test_teacher_urls():
    from lora_llava.datagen.teacher import chat_url
    from lora_llava.errors import UsageError

    assert chat_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_url("https://api.example.com/v1/") == "https://api.example.com/v1/chat/completions"
    assert chat_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    with pytest.raises(UsageError, match="http:// or https://"):
        chat_url("file:///etc/passwd")


def _has_serve() -> bool:
    from lora_llava.cli.main import COMMANDS

    return "serve" in COMMANDS


@pytest.mark.skipif(not _has_serve(), reason="this tree has no 'lora-llava serve' command")
def test_against_lora_llava_serve(tmp_path, tiny_llava):
    """Once against the project's own OpenAI-compatible server on the tiny random model (when this tree has
    `lora-llava serve`): the protocol, the key and the token counts work end to end. The random model writes noise,
    cut at max_tokens, so every reply is a counted reject; none fails."""
    pytest.importorskip("uvicorn")
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SERVE_KEY": KEY, "MY_TEACHER_KEY": KEY}
    server = subprocess.Popen([sys.executable, "-m", "lora_llava", "serve", str(tiny_llava), "--port", str(port),
                               "--api-key-env", "SERVE_KEY", "--max-new-tokens", "16"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-2000:]
                time.sleep(0.2)
        prompts = tmp_path / "prompts"  # the tiny model's context is 512 tokens: short prompts, no examples
        for kind in KINDS:
            (prompts / kind).mkdir(parents=True)
            (prompts / kind / "system.txt").write_text(f"Write {kind} data about the image.")
        ann = make_images(tmp_path, ["A red cube on a table."])
        r = run_cli(ann, tmp_path / "out.jsonl", f"http://127.0.0.1:{port}/v1", "--api-key-env", "MY_TEACHER_KEY",
                    "--prompts", str(prompts), "--system-in-user", "--max-tokens", "16", "--no-progress")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert KEY not in r.stdout + r.stderr
    written = len(lines(tmp_path / "out.jsonl"))
    rejects = lines(tmp_path / "out.jsonl.rejects.jsonl")
    assert written + len(rejects) == 3 and "failed      0" in r.stdout
    assert all(x["reply"] for x in rejects)
    tokens_in = int(r.stdout.split("tokens      ")[1].split(" in")[0])
    assert tokens_in > 0


def test_system_in_user_and_a_stop_when_every_request_is_refused(tmp_path):
    ann = make_images(tmp_path, [f"Picture {i}." for i in range(6)])
    args = ["data", "generate", str(ann), "--image-folder", str(tmp_path / "images"), "--out",
            str(tmp_path / "o.jsonl"), "--kind", "conversation", "--teacher-model", "m", "--no-progress"]
    with ScriptedTeacher(no_system=True) as t:
        assert main([*args, "--teacher-url", t.url]) == 1  # 400 "no system messages" four times: stop
        assert 4 <= len(t.requests) <= 6
        assert lines(tmp_path / "o.jsonl") == []
    with ScriptedTeacher(no_system=True) as t:
        assert main([*args, "--teacher-url", t.url, "--system-in-user"]) == 0
        messages = t.requests[0]["body"]["messages"]
    system = load_prompts(None)["conversation"].system
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"].startswith(system + "\n\n") and len(lines(tmp_path / "o.jsonl")) == 6


def test_retry_rejected_asks_again_without_duplicating_rejects(tmp_path):
    ann = make_images(tmp_path, ["A #malformed reply.", "A fine one."])
    jobs = make_jobs(read_annotations([ann]), ["conversation"])
    with ScriptedTeacher() as t:
        first = generate(jobs, load_prompts(None, ("conversation",)), Teacher(t.url, "m"), tmp_path / "o.jsonl",
                         progress=False)
        again = generate(jobs, load_prompts(None, ("conversation",)), Teacher(t.url, "m"), tmp_path / "o.jsonl",
                         progress=False)
        retried = generate(jobs, load_prompts(None, ("conversation",)), Teacher(t.url, "m"), tmp_path / "o.jsonl",
                           progress=False, retry_rejected=True)
        assert len(t.requests) == 3
    assert (first.written, dict(first.rejected)) == (1, {"no_labels": 1})
    assert (again.skipped, again.written, sum(again.rejected.values())) == (2, 0, 0)
    assert (retried.skipped, dict(retried.rejected)) == (1, {"no_labels": 1})
    assert [r["id"] for r in lines(tmp_path / "o.jsonl.rejects.jsonl")] == ["im000.png:conversation"]
