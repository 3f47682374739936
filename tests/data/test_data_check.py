"""`lora-llava data check`: every bad record named, lengths and dumps exactly as training tokenizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from lora_llava.cli.main import main
from lora_llava.data import LlavaDataset
from lora_llava.data.check import check_data
from lora_llava.errors import UsageError
from lora_llava.llava.constants import IGNORE_INDEX
from lora_llava.llava.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    """The tokenizer the check uses by default (Vicuna + <image> + <pad>), built once; not the shared fixture,
    which must stay without the added tokens."""
    return load_tokenizer()


def _conv(*values, roles=None):
    roles = roles or ["human", "gpt"] * len(values)
    return [{"from": r, "value": v} for r, v in zip(roles, values)]


def _images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (20, 10), (200, 30, 30)).save(folder / "good.png")
    Image.new("L", (8, 8), 90).save(folder / "grey.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")  # exists, but not under the folder
    return folder


CLEAN = [
    {"id": "a", "image": "good.png", "conversations": _conv("<image>\nWhat is it?", "A red rectangle.")},
    {"id": "b", "image": "grey.png", "conversations": _conv("What colour?", "Grey.")},  # tag added, as in training
    {"id": "c", "conversations": _conv("Say hi.", "Hi!")},
    {"id": "d", "image": "good.png",
     "conversations": _conv("<image>\nShape?", "A rectangle.", "Colour?", "Red, mostly, with no other colour.")},
]

BAD = {  # index in the file -> (record, words the report must give for it)
    1: ({"id": "broken", "image": "broken.png", "conversations": _conv("<image>\nQ", "A")}, "cannot be decoded"),
    2: ({"id": "missing", "image": "nope.png", "conversations": _conv("<image>\nQ", "A")}, "'nope.png' not found"),
    3: ({"id": "escape", "image": "../outside.png", "conversations": _conv("<image>\nQ", "A")},
        "leaves the image folder"),
    4: ({"id": "humans", "conversations": _conv("Q", "Q again", roles=["human", "human"])},
        "conversations[1].from is 'human' but turns must alternate"),
    5: ({"id": "open", "conversations": _conv("Q", "A", "Q2")}, "ends on a human turn"),
    6: ({"id": "empty", "conversations": _conv("Q", "  ")}, "empty answer"),
    7: ({"id": "tags", "image": "good.png", "conversations": _conv("<image><image>\nQ", "A")},
        "2 '<image>' tag(s) but field 'image' gives 1 image(s)"),
    8: ({"id": "number", "conversations": _conv("Q", 42)}, "conversations[1].value must be a string, got int"),
    9: ({"id": "noconv", "image": "good.png"}, "field 'conversations' is missing"),
    10: ({"id": "pad", "conversations": _conv("Q", "Fill <pad> here.")},
         "conversations[1].value contains '<pad>', which the tokenizer would read as its padding token"),
}


def _bad_file(tmp_path):
    records = [CLEAN[0], *(rec for rec, _ in BAD.values()), CLEAN[2]]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return path, records


def _dataset(records, tok, folder, **kw):
    return LlavaDataset.from_records(records, tok, "vicuna_v1", image_token_id=tok.convert_tokens_to_ids("<image>"),
                                     num_image_tokens=kw.pop("num_image_tokens", 576), image_folder=str(folder), **kw)


def test_clean_dataset_counts_and_lengths(tmp_path, tok):
    folder = _images(tmp_path)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(CLEAN))
    report = check_data([data], folder, tokenizer=tok)
    assert report.ok and not report.problems
    assert (report.records, report.with_image, report.text_only, report.kept) == (4, 3, 1, 4)
    assert report.truncated == report.too_long == 0
    ds = _dataset(CLEAN, tok, folder, max_length=2048)
    assert sorted(report.lengths) == sorted(row["length"] for row in ds.rows)
    stats = report.percentiles()
    assert list(stats) == ["p50", "p90", "p99", "max"]
    assert 576 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"] == max(report.lengths)
    text = report.format()
    assert "records: 4 in 1 file(s): 3 with image, 1 text-only" in text and "errors: 0" in text
    assert text.endswith("OK")
    plain = check_data([data], folder, tokenizer=tok, template="plain")  # stage-1 format: one round per record
    assert [(p.where, p.id) for p in plain.problems] == [(f"{data}, record 3", "d")]
    assert "exactly one question and one answer" in plain.problems[0].reason


def test_every_bad_record_is_named_through_the_cli(tmp_path):
    folder = _images(tmp_path)
    data, _ = _bad_file(tmp_path)
    r = subprocess.run([sys.executable, "-m", "lora_llava", "data", "check", str(data), "--image-folder", str(folder)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert f"errors: {len(BAD)}" in r.stdout
    for index, (record, reason) in BAD.items():
        line = next((ln for ln in r.stdout.splitlines() if f"{data}, record {index} " in ln), None)
        assert line is not None, f"record {index} not reported:\n{r.stdout}"
        assert f"(id '{record['id']}')" in line and reason in line, line
    last = len(BAD) + 1
    assert "record 0 " not in r.stdout and f"record {last} " not in r.stdout  # the good ones
    assert f"records: {last + 1} in 1 file(s)" in r.stdout and "2 records would train" in r.stdout
    assert r.stdout.rstrip().endswith("FAILED")


def test_workers_and_no_decode(tmp_path, tok):
    folder = _images(tmp_path)
    data, _ = _bad_file(tmp_path)
    one = check_data([data], folder, tokenizer=tok)
    two = check_data([data], folder, tokenizer=tok, workers=2)
    assert [str(p) for p in two.problems] == [str(p) for p in one.problems]
    assert len(one.problems) == len(BAD) and not one.ok
    fast = check_data([data], folder, tokenizer=tok, decode_images=False)
    assert {p.id for p in fast.problems} == {rec["id"] for rec, _ in BAD.values()} - {"broken"}
    assert "existence checked only" in fast.format()


def test_dump_equals_training_rows_and_masks_only_answers(tmp_path, tok):
    folder = _images(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CLEAN))
    dump = tmp_path / "out" / "rows.jsonl"
    dump.parent.mkdir()
    report = check_data([data], folder, tokenizer=tok, dump=dump)
    assert report.ok and report.dump == dump
    assert os.listdir(dump.parent) == ["rows.jsonl"]  # no temporary file left
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    ds = _dataset(CLEAN, tok, folder, max_length=2048)
    assert rows == [{k: row[k] for k in ("id", "input_ids", "labels")} for row in ds.rows]

    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    assert all(lab != IGNORE_INDEX for lab in labels[first:])  # one answer: supervised from it to the end
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]).strip() == "A red rectangle.</s>"
    assert tok.decode(ids[:first]).endswith("ASSISTANT:")  # everything before the answer is masked
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 576


class _Interrupting:
    """The real tokenizer, until its third text: then Ctrl-C (as a user pressing it mid-check)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return self.tok(*args, **kwargs)


def test_interrupted_dump_leaves_nothing(tmp_path, tok):
    folder = _images(tmp_path)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(CLEAN))
    out = tmp_path / "dump"
    out.mkdir()
    tokenizer = _Interrupting(tok)
    with pytest.raises(KeyboardInterrupt):
        check_data([data], folder, tokenizer=tokenizer, dump=out / "rows.jsonl")
    assert tokenizer.calls == 3 and os.listdir(out) == []


def test_too_long_counted_as_training_counts(tmp_path, tok):
    folder = _images(tmp_path)
    records = [
        {"id": "long-text", "conversations": _conv("Tell me.", " ".join(["word"] * 200))},  # cut at the end
        {"id": "long-image", "image": "good.png", "conversations": _conv("<image>\nQ", "A")},  # would split image
        {"id": "long-question", "conversations": _conv(" ".join(["why"] * 200), "Because.")},  # no answer left
        {"id": "short", "conversations": _conv("Hi", "Hello")},
    ]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    dump = tmp_path / "rows.jsonl"
    report = check_data([data], folder, tokenizer=tok, max_length=64, num_image_tokens=100, dump=dump)
    ds = _dataset(records, tok, folder, max_length=64, num_image_tokens=100)
    assert (report.kept, report.truncated, report.too_long) == (2, 1, 2)
    assert (ds.report.kept, ds.report.truncated, ds.report.too_long) == (2, 1, 2)
    assert report.ok and not report.problems  # too long is training's drop, not a bad record
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["long-text", "short"] and len(rows[0]["input_ids"]) == 64
    assert rows == [{k: row[k] for k in ("id", "input_ids", "labels")} for row in ds.rows]
    assert max(report.lengths) > 200  # lengths are before truncation
    assert "max_length 64: 1 truncated, 2 dropped as too long; 2 records would train" in report.format()


def test_broken_json_named_with_line_and_column(tmp_path, tok):
    folder = _images(tmp_path)
    broken = tmp_path / "a.json"
    broken.write_text('[{"id": 1,\n "conversations": [}]')
    lines = tmp_path / "b.jsonl"
    lines.write_text(json.dumps(CLEAN[2]) + "\n{oops\n" + json.dumps(BAD[6][0]) + "\n")
    report = check_data([broken, lines], folder, tokenizer=tok)
    text = report.format()
    assert f"{broken}: not valid JSON" in text and "line 2, column" in text
    assert f"{lines}, record 1: line 2 is not valid JSON (Expecting property name" in text
    assert f"{lines}, record 2 (id 'empty')" in text  # the check goes on after a bad line
    assert report.records == 3 and report.kept == 1 and len(report.problems) == 3 and not report.ok


def test_bad_command_is_exit_2(tmp_path, capsys):
    folder = _images(tmp_path)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(CLEAN))
    assert main(["data", "check", str(tmp_path / "none.json"), "--image-folder", str(folder)]) == 2
    assert "data file" in capsys.readouterr().err
    assert main(["data", "check", str(data), "--image-folder", str(data)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["data", "check", str(data), "--image-folder", str(folder), "--dump", str(tmp_path / "x/y.jsonl")]) == 2
    # A folder as --dump is refused before any record is checked (it failed after the whole check), and kept.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["data", "check", str(data), "--image-folder", str(folder), "--dump", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert f"--dump '{tmp_path / 'out'}' is a folder" in captured.err and "records:" not in captured.out
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    assert main(["data", "check", str(data), "--image-folder", str(folder), "--tokenizer", str(tmp_path / "no")]) == 2
    assert "not a local folder" in capsys.readouterr().err
    with pytest.raises(UsageError, match="unknown template 'nope'"):
        check_data([data], folder, template="nope")


def test_help_shows_the_docstring(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "check", "--help"])
    assert e.value.code == 0
    assert "Check every record of LLaVA JSON / JSONL data the way training reads it" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert "data" in capsys.readouterr().out


def test_literal_special_tokens_warn_with_what_they_become(tmp_path, tok):
    """'</s>' (or '<s>', '<unk>') in a text trains, as in the reference, as that special token: the check warns and
    says so; the report stays OK. Training's ids hold the token the warning names."""
    folder = _images(tmp_path)
    record = {"id": "eos", "conversations": _conv("Why does </s> end it?", "Because.")}
    data = tmp_path / "data.json"
    data.write_text(json.dumps([record, CLEAN[2]]))
    report = check_data([data], folder, tokenizer=tok, max_length=None)
    assert report.ok and len(report.warnings) == 1
    assert str(report.warnings[0]) == (f"{data}, record 0 (id 'eos'): conversations[0].value contains '</s>', which "
                                       "becomes the end-of-sequence token (2), as in the LLaVA reference")
    assert "warnings: 1" in report.format()
    ids = _dataset([record], tok, folder, cache_dir=False)[0]["input_ids"]
    assert ids.count(2) == 2  # the literal one in the question, and the one that closes the answer
