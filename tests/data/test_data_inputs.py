"""Readers, images and the collator: bad input named precisely, padding and padding-free batches exact."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lora_llava.data import LlavaCollator, LlavaDataset, read_records
from lora_llava.data.images import expand_to_square, load_image, resolve_image_path
from lora_llava.data.sources import sample_from_record
from lora_llava.errors import DataError, ImageError
from lora_llava.llava.constants import CLIP_MEAN, IGNORE_INDEX


def _rec(**kw):
    r = {"id": "x", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    r.update(kw)
    return r


@pytest.mark.parametrize("record, message", [
    ({"id": 1}, "field 'conversations' is missing"),
    (_rec(conversations=[]), "'conversations' must be a non-empty list"),
    (_rec(conversations=[{"from": "bot", "value": "x"}]), "conversations[0].from is 'bot'"),
    (_rec(conversations=[{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]),
     "conversations[1].from is 'human' but turns must alternate"),
    (_rec(conversations=[{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                         {"from": "human", "value": "c"}]), "ends on a human turn"),
    (_rec(conversations=[{"from": "human", "value": "a"}, {"from": "gpt", "value": "  "}]), "empty answer"),
    (_rec(conversations=[{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}]),
     "conversations[0].value must be a string, got int"),
    (_rec(image="a.png", conversations=[{"from": "human", "value": "<image><image>"},
                                        {"from": "gpt", "value": "b"}]),
     "2 '<image>' tag(s) but field 'image' gives 1"),
    (_rec(image=5), "field 'image' must be a path or a list of paths"),
])
def test_bad_records_are_named(record, message):
    with pytest.raises(DataError) as e:
        sample_from_record(record, 7, "train.json")
    assert str(e.value).startswith("train.json, record 7: ")
    assert message in str(e.value)


def test_image_without_tag_gets_one_in_first_question():
    s = sample_from_record(_rec(image="a.png"), 0)
    assert s.turns[0] == ("human", "<image>\nHi") and s.images == ["a.png"]


def test_broken_json_names_line_and_column(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[{"id": 1,\n "conversations": [}]')
    with pytest.raises(DataError, match=r"d.json: not valid JSON .* line 2, column \d+"):
        list(read_records([p]))
    q = tmp_path / "d.jsonl"
    q.write_text(json.dumps(_rec()) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d.jsonl: line 2 is not valid JSON"):
        list(read_records([q]))
    r = tmp_path / "o.json"
    r.write_text('{"a": 1}')
    with pytest.raises(DataError, match="expected a JSON list of records, got dict"):
        list(read_records([r]))


def test_image_path_cannot_escape(tmp_path):
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ImageError, match="leaves the image folder"):
        resolve_image_path(tmp_path / "imgs", "../secret.png")
    with pytest.raises(ImageError, match="leaves the image folder"):
        resolve_image_path(tmp_path / "imgs", "/etc/passwd")


def test_pad_to_square_uses_clip_mean_and_centres(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    im = load_image(tmp_path, "a.png", "pad")
    assert im.size == (40, 40)
    mean = tuple(int(c * 255) for c in CLIP_MEAN)
    assert im.getpixel((0, 0)) == mean and im.getpixel((20, 20)) == (255, 0, 0)
    assert im.getpixel((20, 9)) == mean and im.getpixel((20, 10)) == (255, 0, 0)
    assert load_image(tmp_path, "a.png", "resize").size == (40, 20)
    assert expand_to_square(Image.new("RGB", (5, 5)), (0, 0, 0)).size == (5, 5)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "LA"])
def test_images_become_rgb(tmp_path, mode):
    Image.new(mode, (8, 8)).save(tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}")
    im = load_image(tmp_path, f"x.{'jpg' if mode == 'CMYK' else 'png'}", "pad")
    assert im.mode == "RGB"


def test_corrupt_and_missing_images(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match="'bad.png' cannot be decoded"):
        load_image(tmp_path, "bad.png")
    with pytest.raises(ImageError, match="'none.png' not found"):
        load_image(tmp_path, "none.png")


def test_dataset_skip_counts_bad_records(vicuna_tokenizer, tmp_path):
    records = [_rec(), {"id": "broken"}, _rec(image="missing.png")]
    ds = LlavaDataset.from_records(records, vicuna_tokenizer, "vicuna_v1", image_token_id=32000, num_image_tokens=4,
                                   image_folder=str(tmp_path), on_bad_sample="skip")
    assert len(ds) == 1 and ds.report.records == 3 and len(ds.report.problems) == 2
    assert "record 1: field 'conversations' is missing" in str(ds.report.problems[0])
    assert "record 2" in str(ds.report.problems[1]) and "missing.png" in str(ds.report.problems[1])
    with pytest.raises(DataError, match="record 1: field 'conversations' is missing"):
        LlavaDataset.from_records(records, vicuna_tokenizer, "vicuna_v1", image_token_id=32000, num_image_tokens=4)


class _FakeImageProcessor:
    image_mean = CLIP_MEAN

    def __call__(self, images, return_tensors):
        return {"pixel_values": torch.stack([torch.full((3, 2, 2), float(im.getpixel((0, 0))[0])) for im in images])}


def test_collator_pads_right_and_masks(tmp_path):
    Image.new("RGB", (4, 4), (10, 0, 0)).save(tmp_path / "a.png")
    feats = [{"input_ids": [1, 5, 6], "labels": [-100, -100, 6], "image_files": ["a.png"]},
             {"input_ids": [1, 7], "labels": [-100, 7], "image_files": []}]
    b = LlavaCollator(_FakeImageProcessor(), pad_token_id=0, image_folder=str(tmp_path))(feats)
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert b["labels"].tolist() == [[-100, -100, 6], [-100, 7, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["pixel_values"].shape == (1, 3, 2, 2) and b["pixel_values"][0, 0, 0, 0] == 10


def test_collator_padding_free_restarts_positions():
    feats = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [1, 7]}]
    b = LlavaCollator(_FakeImageProcessor(), pad_token_id=0, padding_free=True)(feats)
    assert b["input_ids"].tolist() == [[1, 5, 6, 1, 7]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # The first token of each sample is never a target across the boundary.
    assert b["labels"].tolist() == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7]]
    assert "attention_mask" not in b and "pixel_values" not in b


def test_image_over_the_pixel_limit_is_refused(tmp_path, monkeypatch):
    import lora_llava.data.images as images

    Image.new("RGB", (40, 30)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)  # a 40x30 image stands in for a decompression bomb
    with pytest.raises(ImageError, match=r"image 'big.png' is 40x30, over the 1000 pixel limit"):
        images.load_image(tmp_path, "big.png")
    # A truncated file (the first half of a real PNG) is a decode error naming the image, not a crash.
    monkeypatch.setattr(images, "MAX_PIXELS", 10**8)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="image 'cut.png' cannot be decoded"):
        images.load_image(tmp_path, "cut.png")


def test_sixteen_bit_greyscale_keeps_its_tones(tmp_path):
    """A 16-bit greyscale PNG (40000 of 65535) was loaded as pure white (PIL clips at 255); it must keep its grey."""
    import numpy as np

    values = np.array([[0, 40000], [65535, 257]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    image = load_image(tmp_path, "g16.png", aspect="resize")
    assert image.mode == "RGB"
    assert [image.getpixel(xy) for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [
        (0, 0, 0), (156, 156, 156), (255, 255, 255), (1, 1, 1)]


def test_data_file_mistakes_are_named(tmp_path):
    """A folder given as a data file is named as a folder (it said "does not exist"); a JSON file with a byte-order
    mark is read."""
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="is a folder, not a data file"):
        list(read_records([tmp_path / "data"]))
    record = {"id": "a", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([record]).encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(record).encode() + b"\n")
    assert [s.id for s in read_records([tmp_path / "bom.json", tmp_path / "bom.jsonl"])] == ["a", "a"]
