"""Cached multi-process tokenization, Hugging Face dataset sources, image placement."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from lora_llava.data import LlavaDataset
from lora_llava.data.sources import place_image
from lora_llava.errors import DataError

COMMON = dict(image_token_id=32000, num_image_tokens=4)


def _records(n: int = 12) -> list[dict]:
    out = []
    for i in range(n):
        rec = {"id": f"s{i}", "conversations": [
            {"from": "human", "value": ("<image>\n" if i % 3 else "") + f"Question {i}?"},
            {"from": "gpt", "value": "answer " * (1 + i % 5)}]}
        if i % 3:
            rec["image"] = "a.png"
        out.append(rec)
    return out


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
    return tmp_path


def _rows(ds) -> list[tuple]:
    return [(r["id"], r["input_ids"], r["labels"], r["length"], r["has_image"]) for r in ds.rows]


def test_cache_is_reused_and_invalidated(vicuna_tokenizer, folder, tmp_path):
    cache = tmp_path / "cache"
    first = LlavaDataset.from_records(_records(), vicuna_tokenizer, "vicuna_v1", image_folder=str(folder),
                                      cache_dir=str(cache), **COMMON)
    assert not first.report.cached and len(list(cache.glob("*.arrow"))) == 1
    again = LlavaDataset.from_records(_records(), vicuna_tokenizer, "vicuna_v1", image_folder=str(folder),
                                      cache_dir=str(cache), **COMMON)
    assert again.report.cached and _rows(again) == _rows(first)
    # Anything that changes the tokens changes the cache key: the template, the records, max_length.
    other = LlavaDataset.from_records(_records(), vicuna_tokenizer, "llava_v0", image_folder=str(folder),
                                      cache_dir=str(cache), **COMMON)
    assert not other.report.cached and _rows(other) != _rows(first)
    changed = _records()
    changed[5]["conversations"][1]["value"] = "a different answer"
    assert not LlavaDataset.from_records(changed, vicuna_tokenizer, "vicuna_v1", image_folder=str(folder),
                                         cache_dir=str(cache), **COMMON).report.cached
    assert not LlavaDataset.from_records(_records(), vicuna_tokenizer, "vicuna_v1", image_folder=str(folder),
                                         cache_dir=str(cache), max_length=60, **COMMON).report.cached
    assert len(list(cache.glob("*.arrow"))) == 4  # first, other template, changed record, max_length


def test_multi_process_equals_single_process(vicuna_tokenizer, folder):
    one = LlavaDataset.from_records(_records(40), vicuna_tokenizer, "vicuna_v1", image_folder=str(folder),
                                    cache_dir=False, num_proc=1, **COMMON)
    two = LlavaDataset.from_records(_records(40), vicuna_tokenizer, "vicuna_v1", image_folder=str(folder),
                                    cache_dir=False, num_proc=2, **COMMON)
    assert _rows(one) == _rows(two)
    assert [r["has_image"] for r in one.rows] == [bool(i % 3) for i in range(40)]
    assert all(r["length"] == len(r["input_ids"]) for r in one.rows)


def test_bad_record_found_in_a_worker_is_named(vicuna_tokenizer, folder):
    records = _records(10)
    records[7]["image"] = "gone.png"
    with pytest.raises(DataError, match=r"record 7: image 'gone.png' not found"):
        LlavaDataset.from_records(records, vicuna_tokenizer, "vicuna_v1", image_folder=str(folder), cache_dir=False,
                                  num_proc=2, **COMMON)
    ds = LlavaDataset.from_records(records, vicuna_tokenizer, "vicuna_v1", image_folder=str(folder), cache_dir=False,
                                   on_bad_sample="skip", **COMMON)
    assert len(ds) == 9 and [str(p) for p in ds.report.problems] == [f"record 7: image 'gone.png' not found (looked at "
                                                  f"'{folder / 'gone.png'}')"]


def test_hugging_face_sources(vicuna_tokenizer, folder, tmp_path):
    records = _records(6)
    rows = [{"id": r["id"], "image": r.get("image"), "conversations": r["conversations"]} for r in records]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "data.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "data.json").write_text(json.dumps(records))
    reference = _rows(LlavaDataset.from_files([tmp_path / "data.json"], vicuna_tokenizer, "vicuna_v1",
                                              image_folder=str(folder), cache_dir=False, **COMMON))
    for source in ("data.parquet", "saved", "saved_dict"):
        got = LlavaDataset.from_files([str(tmp_path / source)], vicuna_tokenizer, "vicuna_v1",
                                      image_folder=str(folder), cache_dir=False, **COMMON)
        assert _rows(got) == reference, source
    # Several sources at once, in order.
    both = LlavaDataset.from_files([str(tmp_path / "data.parquet"), str(tmp_path / "data.json")], vicuna_tokenizer,
                                   "vicuna_v1", image_folder=str(folder), cache_dir=False, **COMMON)
    assert _rows(both) == reference + reference


def test_hugging_face_source_problems_are_named(vicuna_tokenizer, tmp_path):
    datasets.Dataset.from_list([{"id": "a", "text": "no conversations"}]).to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(DataError, match=r"x.parquet: the dataset has no 'conversations' column"):
        LlavaDataset.from_files([str(tmp_path / "x.parquet")], vicuna_tokenizer, "vicuna_v1", **COMMON)
    embedded = datasets.Dataset.from_list([{"id": "a", "image": Image.new("RGB", (4, 4)), "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}])
    embedded.save_to_disk(str(tmp_path / "embedded"))
    with pytest.raises(DataError, match="embedded images"):
        LlavaDataset.from_files([str(tmp_path / "embedded")], vicuna_tokenizer, "vicuna_v1", **COMMON)
    with pytest.raises(DataError, match=r"hf:nobody/nothing: could not load the dataset"):
        LlavaDataset.from_files(["hf:nobody/nothing"], vicuna_tokenizer, "vicuna_v1", **COMMON)


def test_image_position():
    import random

    turns = [("human", "What is this? <image>"), ("gpt", "A cat.")]
    assert place_image(turns, "first")[0] == ("human", "<image>\nWhat is this?")
    placed = {place_image(turns, "random", random.Random(seed))[0][1] for seed in range(20)}
    assert placed == {"<image>\nWhat is this?", "What is this?\n<image>"}
    two = [("human", "<image> and <image>?"), ("gpt", "Both.")]
    assert place_image(two, "random", random.Random(0)) == two  # several images: left as written


def test_random_image_position_is_deterministic(vicuna_tokenizer, folder):
    def build(seed):
        return LlavaDataset.from_records(_records(30), vicuna_tokenizer, "vicuna_v1", image_folder=str(folder),
                                         cache_dir=False, image_position="random", seed=seed, **COMMON)

    a, b, c = build(0), build(0), build(1)
    assert _rows(a) == _rows(b) and _rows(a) != _rows(c)
    # Both placements occur: the image tokens come right after the prompt header, or after the question.
    starts = {r["input_ids"].index(32000) for r in a.rows if r["has_image"]}
    assert len(starts) > 1


def test_bare_image_question_gets_no_newline(vicuna_tokenizer, folder):
    """A first question that is only "<image>" stays "<image>" (the reference's strip() drops the newline), so the
    tokens after the image tokens are SentencePiece's for a piece " ASSISTANT:" (the boundary "▁" 29871, then "▁A"
    ...), as the reference's tokenizer_image_token gives (tests/export/test_reference.py), not "\\n" (13)."""
    import random

    assert place_image([("human", "<image>"), ("gpt", "A cat.")], "first")[0] == ("human", "<image>")
    assert place_image([("human", " <image>\n"), ("gpt", "A cat.")], "random", random.Random(0))[0][1] == "<image>"
    record = {"id": "bare", "image": "a.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                 {"from": "gpt", "value": "A cat."}]}
    ds = LlavaDataset.from_records([record], vicuna_tokenizer, "vicuna_v1", image_folder=str(folder), cache_dir=False,
                                   **COMMON)
    ids = ds[0]["input_ids"]
    after = ids[max(i for i, t in enumerate(ids) if t == COMMON["image_token_id"]) + 1:]
    assert after[:3] == [29871, 319, 1799]
    assert 13 not in after[:2]


def test_image_problems_are_found_again_on_every_run(vicuna_tokenizer, folder, tmp_path):
    """The tokenization cache keeps no verdict about images: an image added, deleted or replaced after a run is seen
    by the next one (issue: a stale "not found", and a crash mid-training for an image deleted after caching)."""
    cache = tmp_path / "cache"
    records = _records(10)
    records[7]["image"] = "late.png"

    def build(**kwargs):
        return LlavaDataset.from_records(records, vicuna_tokenizer, "vicuna_v1", image_folder=str(folder),
                                         cache_dir=str(cache), **COMMON, **kwargs)

    with pytest.raises(DataError, match=r"record 7: image 'late.png' not found"):
        build()
    Image.new("RGB", (8, 8), (0, 0, 200)).save(folder / "late.png")  # the user adds the image
    ds = build()
    assert ds.report.cached and len(ds) == 10 and not ds.report.problems
    (folder / "late.png").unlink()  # ... and deletes it again
    with pytest.raises(DataError, match=r"record 7: image 'late.png' not found"):
        build()
    skipped = build(on_bad_sample="skip")
    assert skipped.report.cached and len(skipped) == 9 and "late.png" in str(skipped.report.problems[0])
    # Replaced by something that is not an image (same name): caught too, not met mid-training.
    (folder / "late.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match=r"record 7: image 'late.png' cannot be decoded"):
        build()


@pytest.mark.parametrize("kind", ["random", "empty", "truncated", "huge"])
def test_undecodable_images_are_skipped_or_refused_before_training(vicuna_tokenizer, folder, tmp_path, kind,
                                                                 monkeypatch):
    import io
    import os

    from lora_llava.data import images

    bad = folder / "bad.png"
    if kind == "random":
        bad.write_bytes(os.urandom(2000))
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated":  # a valid header, then the pixel data cut short
        buf = io.BytesIO()
        Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "PNG")
        bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    else:
        monkeypatch.setattr(images, "MAX_PIXELS", 1000)
        Image.new("RGB", (40, 30)).save(bad)
    records = _records(12)
    records[4]["image"] = "bad.png"
    for cache in (str(tmp_path / "cache"), False):
        with pytest.raises(DataError, match=r"record 4: image 'bad.png' (cannot be decoded|is 40x30, over)"):
            LlavaDataset.from_records(records, vicuna_tokenizer, "vicuna_v1", image_folder=str(folder),
                                      cache_dir=cache, **COMMON)
        ds = LlavaDataset.from_records(records, vicuna_tokenizer, "vicuna_v1", image_folder=str(folder),
                                       cache_dir=cache, on_bad_sample="skip", **COMMON)
        assert len(ds) == 11 and "bad.png" not in [f for r in ds.rows for f in r["image_files"]]
        skipped = ds.report.to_json()["skipped"]
        assert len(skipped) == 1 and skipped[0].startswith("record 4: image 'bad.png'")
