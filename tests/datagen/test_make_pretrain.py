"""data make-pretrain: image-caption pairs -> stage-1 conversations, checked record by record."""

from __future__ import annotations

import collections
import json

import pytest
from PIL import Image

from lora_llava.cli import main as cli
from lora_llava.datagen.pretrain import BRIEF_INSTRUCTIONS, make_pretrain
from lora_llava.errors import DataError


@pytest.fixture
def captions(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for k in range(6):
        Image.new("RGB", (20 + k, 16), (k * 40, 90, 200)).save(tmp_path / "img" / f"p{k}.png")
        rows.append({"image": f"img/p{k}.png", "caption": f"a blue picture number {k}"})
    return tmp_path, rows


def test_records_are_v1_stage1_conversations(captions, tmp_path):
    folder, rows = captions
    src = folder / "pairs.json"
    src.write_text(json.dumps(rows))
    summary = make_pretrain(src, tmp_path / "chat.json", seed=3)
    out = json.loads((tmp_path / "chat.json").read_text())
    assert summary.records == len(out) == 6
    for row, rec in zip(rows, out):
        assert rec["id"] == row["image"].split("/")[-1][:-4] and rec["image"] == row["image"]
        human, gpt = rec["conversations"]
        assert (human["from"], gpt["from"], gpt["value"]) == ("human", "gpt", row["caption"])
        parts = human["value"].split("\n")
        assert len(parts) == 2 and "<image>" in parts
        assert [p for p in parts if p != "<image>"][0] in BRIEF_INSTRUCTIONS
    # Same input and seed: the same bytes; another seed: other choices.
    make_pretrain(src, tmp_path / "again.json", seed=3)
    assert (tmp_path / "again.json").read_bytes() == (tmp_path / "chat.json").read_bytes()
    make_pretrain(src, tmp_path / "other.json", seed=4)
    assert (tmp_path / "other.json").read_bytes() != (tmp_path / "chat.json").read_bytes()


def test_all_instructions_and_both_placements_are_drawn(tmp_path):
    rows = [{"id": f"r{k}", "image": f"i{k}.jpg", "blip_caption": f"c{k}"} for k in range(2000)]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = make_pretrain(tmp_path / "meta.jsonl", tmp_path / "chat.json")
    assert set(summary.instructions) == set(BRIEF_INSTRUCTIONS)
    assert all(140 < n < 230 for n in summary.instructions.values())  # 2000 / 11 = 182 each, near uniform
    assert 900 < summary.image_first < 1100
    out = json.loads((tmp_path / "chat.json").read_text())
    firsts = collections.Counter(r["conversations"][0]["value"].startswith("<image>\n") for r in out)
    assert firsts[True] == summary.image_first and [r["id"] for r in out[:2]] == ["r0", "r1"]


def test_csv_input_and_the_cli(captions, tmp_path, capsys):
    folder, rows = captions
    src = folder / "pairs.csv"
    src.write_text("image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows))
    assert cli.main(["data", "make-pretrain", str(src), "--out", str(tmp_path / "chat.json"), "--seed", "1"]) == 0
    assert "records      6" in capsys.readouterr().out
    # The output passes data check as it is (plain template: stage 1).
    assert cli.main(["data", "check", str(tmp_path / "chat.json"), "--image-folder", str(folder),
                     "--template", "plain"]) == 0


@pytest.mark.parametrize("content, name, message", [
    ('[{"image": "a.png"}]', "x.json", r"x.json record 0: no 'caption' / 'blip_caption' / 'text' field"),
    ('[{"image": "a.png", "caption": "  "}]', "x.json", r"x.json record 0: 'caption' must be a non-empty string"),
    ('{"image": "a.png", "caption": "ok"}\n{"caption": "no image"}\n', "x.jsonl",
     r"x.jsonl line 2: no 'image' / 'file_name' field"),
    ("image,caption\na.png,\n", "x.csv", r"x.csv line 2: 'caption' must be a non-empty string"),
    ('[{"id": 1, "image": "a.png", "caption": "x"}, {"id": 1, "image": "b.png", "caption": "y"}]', "x.json",
     "records 0 and 1 have the same id '1'"),
    ("{}", "x.json", "x.json"),
])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        make_pretrain(tmp_path / name, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()
