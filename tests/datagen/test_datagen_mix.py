"""``data mix``: made-up sources of every format, the mixture checked record by record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lora_llava.cli.main import main
from lora_llava.datagen.mix import CAPTION, SHORT_ANSWER, build_mix, load_mix_spec
from lora_llava.errors import DataError, UsageError

BUS = "coco/train2017/000000000001.jpg"
CAR = "coco/train2017/000000000002.jpg"


def write(path: Path, value) -> str:
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path.name


@pytest.fixture
def sources(tmp_path):
    llava = [
        {"id": "a1", "image": BUS, "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the bus?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Is it moving?"}, {"from": "gpt", "value": "No."}]},
        {"id": "t1", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
    ]
    questions = {"questions": [
        {"image_id": 1, "question": "What color is the bus?", "question_id": 10},  # asked by llava: dropped
        {"image_id": 1, "question": "How many wheels are visible?", "question_id": 11},
        {"image_id": 2, "question": "Is the car parked?", "question_id": 20},
        {"image_id": 2, "question": "What brand is the car?", "question_id": 21},
        {"image_id": 2, "question": "is  the car parked? ", "question_id": 22},  # same question again: dropped
    ]}
    annotations = {"annotations": [
        {"question_id": 10, "multiple_choice_answer": "red"},
        {"question_id": 11, "multiple_choice_answer": "4"},
        {"question_id": 20, "multiple_choice_answer": "yes"},
        {"question_id": 21, "answers": [{"answer": "ford"}, {"answer": "bmw"}, {"answer": "ford"}]},
        {"question_id": 22, "multiple_choice_answer": "no"},
    ]}
    gqa = {"g1": {"imageId": "n100", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes, it is."},
           "g2": {"imageId": "n100", "question": "What is on the left?", "answer": "tree"}}
    ocr = {"0441": {"imageURL": "http://images.example/0441.gif", "title": "T",
                    "questions": ["Who wrote this book?", "Is this a comedy book?"], "answers": ["Ann Lee", "No"]}}
    textcaps = {"data": [{"image_id": "tc1", "caption_str": "A sign that says open."},
                         {"image_id": "tc1", "caption_str": "An open sign on a door."}]}
    csv_text = "image,question,answer\nmine/x.png,What shape is it?,circle\nmine/x.png,What colour is it?,green\n" \
               "mine/y.png,What shape is it?,square\n"
    spec = {"seed": 5, "shuffle": False, "sources": [
        {"name": "instruct", "format": "llava", "path": write(tmp_path / "llava.json", llava)},
        {"name": "vqav2", "format": "vqav2", "questions": write(tmp_path / "q.json", questions),
         "annotations": write(tmp_path / "a.json", annotations)},
        {"name": "gqa", "format": "gqa", "path": write(tmp_path / "gqa.json", gqa)},
        {"name": "ocrvqa", "format": "ocrvqa", "path": write(tmp_path / "ocr.json", ocr)},
        {"name": "textcaps", "format": "textcaps", "path": write(tmp_path / "textcaps.json", textcaps)},
        {"name": "mine", "format": "qa", "path": write(tmp_path / "mine.csv", csv_text), "prompt": ""},
    ]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path


def conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


def test_every_format_record_by_record(sources, capsys):
    assert main(["data", "mix", str(sources / "mix.yaml"), "--out", str(sources / "mix.json")]) == 0
    records = json.loads((sources / "mix.json").read_text())
    assert records == [
        {"id": "a1", "image": BUS, "conversations": conv("<image>\nWhat color is the bus?", "Red.", "Is it moving?",
                                                         "No.")},
        {"id": "t1", "conversations": conv("Say hi.", "Hi.")},
        {"id": "vqav2-000000000001-0", "image": BUS,
         "conversations": conv(f"<image>\nHow many wheels are visible?\n{SHORT_ANSWER}", "4")},
        {"id": "vqav2-000000000002-0", "image": CAR,
         "conversations": conv(f"<image>\nIs the car parked?\n{SHORT_ANSWER}", "yes",
                               f"What brand is the car?\n{SHORT_ANSWER}", "ford")},
        {"id": "gqa-n100-0", "image": "gqa/images/n100.jpg",
         "conversations": conv(f"<image>\nIs the sky blue?\n{SHORT_ANSWER}", "yes",
                               f"What is on the left?\n{SHORT_ANSWER}", "tree")},
        {"id": "ocrvqa-0441-0", "image": "ocr_vqa/images/0441.gif",
         "conversations": conv(f"<image>\nWho wrote this book?\n{SHORT_ANSWER}", "Ann Lee",
                               f"Is this a comedy book?\n{SHORT_ANSWER}", "No")},
        {"id": "textcaps-tc1-0", "image": "textvqa/train_images/tc1.jpg",
         "conversations": conv(f"<image>\n{CAPTION}", "A sign that says open.")},
        {"id": "mine-x-0", "image": "mine/x.png",
         "conversations": conv("<image>\nWhat shape is it?", "circle", "What colour is it?", "green")},
        {"id": "mine-y-0", "image": "mine/y.png", "conversations": conv("<image>\nWhat shape is it?", "square")},
    ]
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    # source format read dup no-image convs taken pairs share
    assert rows["instruct"][2:8] == ["2", "0", "0", "2", "2", "3"]
    assert rows["vqav2"][2:8] == ["5", "2", "0", "2", "2", "3"]
    assert rows["textcaps"][2:8] == ["2", "1", "0", "1", "1", "1"]
    assert rows["total"][1:] == ["16", "3", "0", "9", "9", "14", "100.0%"]  # no format column
    assert "wrote 9 records" in table


def test_counts_ratios_seed_and_shuffle(tmp_path):
    rows = "\n".join(f"img{i:02d}.png,What is in picture {i}?,thing {i}" for i in range(40))
    (tmp_path / "a.csv").write_text("image,question,answer\n" + rows + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"image": f"b{i}.png", "question": "Colour?",
                                                            "answer": str(i)}) for i in range(10)) + "\n")

    def mix(seed, **a):
        spec = {"seed": seed, "sources": [{"name": "a", "format": "qa", "path": "a.csv", **a},
                                          {"name": "b", "format": "qa", "path": "b.jsonl", "ratio": 0.5}]}
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
        return build_mix(load_mix_spec(tmp_path / "s.yaml"))

    records, table = mix(1, count=7)
    assert [r.taken for r in table.rows] == [7, 5] and len(records) == 12
    assert {r["id"].split("-")[0] for r in records} == {"a", "b"}
    again, _ = mix(1, count=7)
    assert again == records  # same seed, same records in the same order
    other, _ = mix(2, count=7)
    assert {r["id"] for r in other} != {r["id"] for r in records}
    assert [r["id"] for r in records] != sorted(r["id"] for r in records)  # shuffled
    records, table = mix(1, ratio=0.25)
    assert table.rows[0].taken == 10 and table.rows[0].available == 40
    records, table = mix(1, count=1000)  # more than there is: all of it
    assert table.rows[0].taken == 40


def test_max_pairs_and_missing_images(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(b"")
    lines = [{"image": "x.png", "question": f"Q{i}?", "answer": f"A{i}"} for i in range(5)]
    lines.append({"image": "gone.png", "question": "Q?", "answer": "A"})
    (tmp_path / "qa.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    spec = {"max_pairs": 2, "image_folder": "imgs", "shuffle": False,
            "sources": [{"format": "qa", "path": "qa.jsonl"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    records, table = build_mix(load_mix_spec(tmp_path / "s.yaml"))
    assert [len(r["conversations"]) // 2 for r in records] == [2, 2, 1]
    assert [r["id"] for r in records] == ["qa-x-0", "qa-x-1", "qa-x-2"]
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)
    assert table.rows[0].no_image == 1


def test_mix_output_passes_data_check(sources):
    from lora_llava.data.check import check_data

    records, _ = build_mix(load_mix_spec(sources / "mix.yaml"))
    for r in records:
        if "image" in r:
            (sources / "images" / r["image"]).parent.mkdir(parents=True, exist_ok=True)
            from PIL import Image
            Image.new("RGB", (4, 4)).save(sources / "images" / r["image"], format="PNG")
    assert main(["data", "mix", str(sources / "mix.yaml"), "--out", str(sources / "mix.json")]) == 0
    report = check_data([sources / "mix.json"], sources / "images", decode_images=True, progress=None)
    assert report.ok, report.format()


@pytest.mark.parametrize(("spec", "message"), [
    ({"sources": [{"format": "vqa", "path": "x.csv"}]}, "sources[0].format: 'vqa'; expected one of"),
    ({"sources": [{"format": "qa", "path": "nope.csv"}]}, "sources[0].path:"),
    ({"sources": [{"format": "vqav2", "questions": "x.csv"}]}, "sources[0].annotations: format vqav2 needs"),
    ({"sources": [{"format": "qa", "path": "x.csv", "ratio": 1.5}]}, "sources[0].ratio: 1.5"),
    ({"sources": [{"format": "qa", "path": "x.csv", "ratio": 0.5, "count": 3}]}, "not both"),
    ({"sources": [{"format": "qa", "path": "x.csv", "weight": 2}]}, "unknown key(s) ['weight']"),
    ({"sources": [{"format": "qa", "path": "x.csv"}, {"format": "qa", "path": "x.csv"}]}, "'x' is used twice"),
    ({"seeds": 1, "sources": []}, "unknown key(s) ['seeds']"),
])
def test_bad_specs_name_the_key(tmp_path, spec, message):
    (tmp_path / "x.csv").write_text("image,question,answer\na.png,q,a\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(UsageError) as e:
        load_mix_spec(tmp_path / "s.yaml")
    assert message in str(e.value)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("x.csv", "image,question\na.png,q\n", "lacks column(s) ['answer']"),
    ("x.csv", "image,question,answer\na.png,q,a\nb.png,,a\n", "x.csv: line 3: column 'question' is empty"),
    ("x.jsonl", '{"image": "a.png", "question": "q"}\n', "x.jsonl: line 1: field 'answer' is missing"),
])
def test_bad_sources_name_file_line_and_field(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"sources": [{"format": "qa", "path": name}]}))
    with pytest.raises(DataError) as e:
        build_mix(load_mix_spec(tmp_path / "s.yaml"))
    assert message in str(e.value)


def test_bad_vqa_files_name_the_entry(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"image_id": 1, "question": "Q?", "question_id": 9}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": []}))
    spec = {"sources": [{"format": "vqav2", "questions": "q.json", "annotations": "a.json"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DataError, match=r"q.json: questions\[0\]: question_id 9 has no annotation"):
        build_mix(load_mix_spec(tmp_path / "s.yaml"))
