"""AnyRes (LLaVA-NeXT / LLaVA-1.5-HD) data: image-token counts from the image headers, equal to transformers'
processor, cached, never cut; the collator's ``image_sizes`` and tiles; padded and padding-free batches of mixed tile
counts train the same loss on a tiny ``LlavaNextForConditionalGeneration``."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_next import PATCH, TILE
from tiny_next import tiny_next as build_tiny_next

from lora_llava.data import LlavaCollator, LlavaDataset
from lora_llava.errors import DataError
from lora_llava.llava.anyres import AnyresGrid, grid_pinpoints
from lora_llava.llava.constants import IMAGE_TOKEN
from lora_llava.llava.tokenizer import image_token_id, load_tokenizer

SIZES = [(32, 32), (40, 90), (90, 40), (64, 64), (20, 200), (57, 31)]  # (height, width): 1, 2 and 4 tiles


def _records(sizes, prefix="im"):
    return [{"id": f"r{k}", "image": f"{prefix}{k}.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                               {"from": "gpt", "value": f"It is colour number {k}."}]}
            for k in range(len(sizes))]


def _write_images(folder, sizes, prefix="im"):
    for k, (h, w) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * k % 255, 90, 200 - 20 * k)).save(folder / f"{prefix}{k}.png")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_next(tokenizer):
    """(model, processor) of a tiny random LLaVA-NeXT (tests/tiny_next.py), in eval mode."""
    model, processor = build_tiny_next(tokenizer)
    return model.eval(), processor


def _dataset(tmp_path, tokenizer, grid, sizes, **kwargs):
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return LlavaDataset.from_records(_records(sizes), tokenizer, "vicuna_v1", image_token_id=image_token_id(tokenizer),
                                     num_image_tokens=(grid.tile // grid.patch) ** 2, image_folder=str(tmp_path),
                                     grid=grid, **kwargs)


def test_counts_through_the_dataset_equal_the_llava_next_processor(tmp_path, tokenizer):
    """Real 336 px / 14 px geometry (LLaVA-1.6's grid set), real image files of several sizes: the dataset's image
    tokens per sample equal the ones transformers' LlavaNextProcessor inserts for the same image."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    pins = grid_pinpoints(336, ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1)))
    sizes = [(336, 336), (480, 640), (640, 480), (100, 1000), (1000, 100), (900, 700), (337, 335), (50, 60)]
    _write_images(tmp_path, sizes)
    grid = AnyresGrid(336, 14, tuple(map(tuple, pins)))
    ds = _dataset(tmp_path, tokenizer, grid, sizes, max_length=4096)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_grid_pinpoints=pins)
    processor = LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   image_token=IMAGE_TOKEN)
    image_id = image_token_id(tokenizer)
    seen = set()
    for k, (h, w) in enumerate(sizes):
        with Image.open(tmp_path / f"im{k}.png") as im:
            out = processor(images=[im.convert("RGB")], text=[f"{IMAGE_TOKEN}\nhi"], return_tensors="pt")
        theirs = int((out["input_ids"] == image_id).sum())
        row = ds[k]
        assert row["image_tokens"] == [theirs], (h, w)
        assert row["input_ids"].count(image_id) == theirs
        assert row["image_sizes"] == [[h, w]]
        assert row["length"] == len(row["input_ids"])  # the grouped sampler's length counts them
        seen.add(theirs)
    assert len(seen) >= 4  # the sizes do give different counts


def test_counts_survive_the_cache_and_a_resized_image_retokenizes(tmp_path, tokenizer):
    grid = AnyresGrid(TILE, PATCH, tuple(map(tuple, grid_pinpoints(TILE))))
    _write_images(tmp_path, SIZES)
    first = _dataset(tmp_path, tokenizer, grid, SIZES)
    assert not first.report.cached
    counts = [first[k]["image_tokens"] for k in range(len(SIZES))]
    assert counts == [[grid.tokens(h, w)] for h, w in SIZES]
    again = _dataset(tmp_path, tokenizer, grid, SIZES)
    assert again.report.cached
    assert [again[k]["image_tokens"] for k in range(len(SIZES))] == counts
    assert [again[k]["input_ids"] for k in range(len(SIZES))] == [first[k]["input_ids"] for k in range(len(SIZES))]
    # Another grid is another cache entry; so is an image replaced by one of another size.
    capped = AnyresGrid(TILE, PATCH, ((TILE, 2 * TILE), (2 * TILE, TILE)))
    other = _dataset(tmp_path, tokenizer, capped, SIZES)
    assert not other.report.cached and other[3]["image_tokens"] == [capped.tokens(64, 64)] != counts[3]
    Image.new("RGB", (20, 200)).save(tmp_path / "im4.png")  # was 20 x 200 (h x w), now 200 x 20
    changed = _dataset(tmp_path, tokenizer, grid, SIZES)
    assert not changed.report.cached
    assert changed[4]["image_tokens"] == [grid.tokens(200, 20)] and changed[4]["image_sizes"] == [[200, 20]]


def test_sample_too_long_because_of_its_image_is_dropped_and_named(tmp_path, tokenizer):
    """Never cut inside the image tokens: a 64 x 64 image takes 88 tokens at this grid, past max_length."""
    grid = AnyresGrid(TILE, PATCH, tuple(map(tuple, grid_pinpoints(TILE))))
    sizes = [(32, 32), (64, 64), (40, 90)]
    _write_images(tmp_path, sizes)
    assert grid.tokens(64, 64) == 16 + 8 * 8 + 8 and grid.tokens(32, 32) == 16 + 4 * 4 + 4
    ds = _dataset(tmp_path, tokenizer, grid, sizes, max_length=115, on_bad_sample="skip")
    assert ds.report.too_long == 1 and ds.report.kept == 2
    assert [ds[k]["id"] for k in range(len(ds))] == ["r0", "r2"]
    why = ds.report.too_long_samples[0]
    assert "record 1" in why and "split image tokens" in why and "88 of them image tokens" in why
    assert "record 1" in ds.report.summary()
    # A missing image: no size, so no count; skipped (or refused) naming the record and the image.
    (tmp_path / "im2.png").unlink()
    with pytest.raises(DataError, match=r"record 2.*im2.png"):
        _dataset(tmp_path, tokenizer, grid, sizes, max_length=256)


def test_collator_feeds_the_llava_next_processor_the_unpadded_image(tmp_path, tokenizer, tiny_next):
    model, processor = tiny_next
    grid = AnyresGrid.from_config(model.config)
    sizes = [(32, 32), (40, 90), (64, 64)]
    _write_images(tmp_path, sizes)
    ds = _dataset(tmp_path, tokenizer, grid, sizes)
    collate = LlavaCollator(processor.image_processor, tokenizer.pad_token_id, str(tmp_path), grid=grid)
    batch = collate([ds[k] for k in range(3)])
    images = [Image.open(tmp_path / f"im{k}.png").convert("RGB") for k in range(3)]
    expected = processor.image_processor(images=images, return_tensors="pt")
    # (images, 1 + most tiles, 3, tile, tile): the 2x2 image has 5 views, the others are zero-padded up to it.
    assert batch["pixel_values"].shape == (3, 5, 3, TILE, TILE)
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert batch["image_sizes"].tolist() == [list(s) for s in sizes]
    assert batch["pixel_values"][0, 3:].abs().sum() == 0  # the 1-tile image's padding views
    # The model takes it as is: features and image tokens agree.
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert torch.isfinite(out.logits).all()
    # An image replaced after tokenization is named, not a shape error inside the model.
    Image.new("RGB", (50, 50)).save(tmp_path / "im1.png")
    with pytest.raises(DataError, match=r"image 'im1.png' is 50x50 .* counted for 40x90"):
        collate([ds[1]])
    with pytest.raises(ValueError, match="grid resolutions"):
        LlavaCollator(processor.image_processor, tokenizer.pad_token_id, str(tmp_path),
                      grid=AnyresGrid(TILE, PATCH, ((TILE, 2 * TILE),)))


def test_padding_free_equals_padded_with_mixed_tile_counts(tmp_path, tokenizer, tiny_next):
    from lora_llava.train.loss import answer_only_loss

    model, processor = tiny_next
    grid = AnyresGrid.from_config(model.config)
    sizes = [(32, 32), (64, 64), (40, 90)]  # 1, 4 and 2 tiles: 36, 88 and a third count of image tokens
    _write_images(tmp_path, sizes)
    ds = _dataset(tmp_path, tokenizer, grid, sizes)
    text_only = LlavaDataset.from_records(
        [{"id": "t", "conversations": [{"from": "human", "value": "Say hi twice."},
                                       {"from": "gpt", "value": "Hi hi, and more words here."}]}],
        tokenizer, "vicuna_v1", image_token_id=image_token_id(tokenizer), num_image_tokens=16, cache_dir=False,
        grid=grid)
    feats = [ds[0], text_only[0], ds[1], ds[2]]
    assert len({sum(f["image_tokens"]) for f in feats}) == 4
    common = (processor.image_processor, tokenizer.pad_token_id, str(tmp_path))
    padded = LlavaCollator(*common, grid=grid)(feats)
    flat = LlavaCollator(*common, padding_free=True, grid=grid)(feats)
    assert torch.equal(padded["image_sizes"], flat["image_sizes"]) and flat["input_ids"].shape[0] == 1
    with torch.no_grad():
        loss_padded, _ = answer_only_loss(model, dict(padded))
        loss_flat, _ = answer_only_loss(model, dict(flat))
        theirs = model(**padded, use_cache=False).loss
    assert torch.allclose(loss_padded, loss_flat, atol=1e-5), (loss_padded, loss_flat)
    assert torch.allclose(loss_padded, theirs, atol=1e-5), (loss_padded, theirs)


def test_data_check_reports_the_image_token_distribution_and_flags_what_no_longer_fits(tmp_path, capsys, tokenizer):
    """`data check --grid-pinpoints default`: counts as training (same tokenizer, header sizes), the distribution of
    image tokens per sample, and the samples too long for --max-length named with their image tokens."""
    import json

    from lora_llava.cli.main import main
    from lora_llava.data.check import check_data

    sizes = [(336, 336), (480, 640), (640, 480), (672, 672), (1000, 1000), (100, 1000)]
    _write_images(tmp_path, sizes)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(_records(sizes) + [{"id": "text", "conversations": [
        {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]))
    grid = AnyresGrid(336, 14, tuple(map(tuple, grid_pinpoints(336))))
    counts = [grid.tokens(h, w) for h, w in sizes]
    assert counts[3] == counts[4] == 2928 and min(counts) < 2000  # the square ones fill the 2x2 grid

    code = main(["data", "check", str(data), "--image-folder", str(tmp_path), "--grid-pinpoints", "default",
                 "--max-length", "2048"])
    out = capsys.readouterr().out
    assert code == 0, out
    ordered = sorted(counts)
    assert (f"image tokens per sample with images, AnyRes grid of 336 px tiles (336x672, 672x336, 672x672; up to 4 "
            f"tiles + the base view, at most 2928 image tokens per image): min {ordered[0]}, median {ordered[2]}, "
            f"p95 {ordered[-1]}, max {ordered[-1]}") in out
    bars = [line for line in out.splitlines() if "#" in line]
    assert len(bars) >= 2 and sum(int(b.split()[1]) for b in bars) == len(sizes)
    # 480 x 640 already takes 2340 image tokens: only the thin image and the text-only record fit 2048.
    assert "4 dropped as too long" in out and "3 records would train" in out
    too_long = out.split("never cut inside the image tokens):")[1]
    assert all(f"record {k} (id 'r{k}'): " in too_long for k in (1, 2, 3, 4)) and "record 0" not in too_long
    assert f"record 4 (id 'r4'): {counts[4] + 56} tokens, 2928 of them image tokens" in too_long
    # The same counts training's dataset gives.
    report = check_data([data], tmp_path, tokenizer=tokenizer, max_length=2048, grid=grid)
    ds = _dataset(tmp_path, tokenizer, grid, sizes, max_length=2048, on_bad_sample="skip")
    assert sorted(report.image_tokens) == ordered
    assert (report.kept, report.too_long) == (ds.report.kept + 1, ds.report.too_long)  # + the text-only record
    # Capped at 2 tiles (data.max_tiles: 2): everything fits.
    code = main(["data", "check", str(data), "--image-folder", str(tmp_path), "--grid-pinpoints", "default",
                 "--max-tiles", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "0 dropped as too long" in out and "up to 2 tiles" in out
    assert main(["data", "check", str(data), "--image-folder", str(tmp_path), "--grid-pinpoints", "336x500"]) == 2
    assert "'336x500' is not HEIGHTxWIDTH in multiples of the 336 px tile" in capsys.readouterr().err


def test_data_check_reads_the_grid_from_a_recipe(tmp_path, capsys):
    """`data check --recipe`: the recipe's model grid (a llava-next-hf checkpoint folder), data.max_tiles and
    data.max_length, as training would count."""
    import json

    import yaml

    from lora_llava.cli.main import main
    from lora_llava.demo import make_demo_model

    model = make_demo_model(tmp_path / "model", image_size=TILE, hidden_size=32, anyres=True)
    _write_images(tmp_path, SIZES)
    data = tmp_path / "train.json"
    data.write_text(json.dumps(_records(SIZES)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"llava": str(model)}, "data": {"train": str(data),
                                      "image_folder": str(tmp_path), "max_tiles": 2, "max_length": 100}}))
    assert main(["data", "check", str(data), "--image-folder", str(tmp_path), "--recipe", str(recipe)]) == 0
    out = capsys.readouterr().out
    capped = AnyresGrid(TILE, PATCH, ((TILE, 2 * TILE), (2 * TILE, TILE)))
    counts = sorted(capped.tokens(h, w) for h, w in SIZES)
    assert f"{TILE}x{2 * TILE}, {2 * TILE}x{TILE}; up to 2 tiles" in out and f"max {counts[-1]}" in out
    assert "max_length 100:" in out
    assert main(["data", "check", str(data), "--image-folder", str(tmp_path), "--recipe", str(recipe),
                 "--grid-pinpoints", "default"]) == 2
    assert "--recipe gives the grid" in capsys.readouterr().err
