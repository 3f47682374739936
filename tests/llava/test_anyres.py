"""AnyRes token counts against transformers' own LLaVA-NeXT processor (what the exported processor inserts)."""

from __future__ import annotations

import pytest
from PIL import Image

from lora_llava.llava.anyres import (
    anyres_image_tokens,
    best_resolution,
    grid_pinpoints,
    limit_tiles,
    max_tiles,
    worst_case_image_tokens,
)
from lora_llava.llava.constants import IMAGE_TOKEN
from lora_llava.llava.tokenizer import load_tokenizer

SIZES = [(336, 336), (480, 640), (640, 480), (100, 1000), (1000, 100), (672, 672), (1344, 672), (337, 335), (7, 9),
         (2000, 1500), (500, 500), (336, 1008)]


def _processor(tile: int, patch: int, pinpoints, strategy: str):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    tok = load_tokenizer()  # Vicuna's vocabulary + <image>, <pad>
    ip = LlavaNextImageProcessor(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                 image_grid_pinpoints=pinpoints)
    return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                              vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                              image_token=IMAGE_TOKEN)


@pytest.mark.parametrize(("tile", "patch", "grids", "strategy"), [
    (336, 14, ((1, 2), (2, 1), (2, 2)), "default"),
    (336, 14, ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1)), "default"),  # LLaVA-1.6's set
    (28, 14, ((1, 2), (2, 1), (2, 2)), "full"),
])
def test_counts_equal_the_llava_next_processor(tile, patch, grids, strategy):
    pinpoints = grid_pinpoints(tile, grids)
    processor = _processor(tile, patch, pinpoints, strategy)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for h, w in SIZES:
        out = processor(images=[Image.new("RGB", (w, h))], text=[f"{IMAGE_TOKEN}\nhi"], return_tensors="pt")
        theirs = int((out["input_ids"] == image_id).sum())
        assert anyres_image_tokens(h, w, tile, patch, pinpoints, strategy) == theirs, (h, w)


def test_best_resolution_and_tiles():
    pins = grid_pinpoints(336)
    assert pins == [[336, 672], [672, 336], [672, 672]]
    assert best_resolution(300, 700, pins) == (336, 672)  # wide -> one row of two tiles
    assert best_resolution(700, 300, pins) == (672, 336)
    assert best_resolution(1000, 1000, pins) == (672, 672)
    assert max_tiles(pins, 336) == 4
    assert limit_tiles(pins, 336, 2) == [[336, 672], [672, 336]]
    with pytest.raises(ValueError, match="at most 1 tiles"):
        limit_tiles(pins, 336, 1)
    # 576 base + 48x48 grid + 48 newlines: a square image fills the 2x2 grid with nothing un-padded.
    assert worst_case_image_tokens(336, 14, pins) == 576 + 48 * 48 + 48 == anyres_image_tokens(672, 672, 336, 14, pins)


def test_grid_from_a_llava_next_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    from lora_llava.llava.anyres import AnyresGrid

    config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14).to_dict(),
                             text_config=LlamaConfig().to_dict(), image_grid_pinpoints=grid_pinpoints(336))
    grid = AnyresGrid.from_config(config)
    assert grid == AnyresGrid.from_config(config.to_dict())
    assert (grid.tile, grid.patch, grid.pinpoints) == (336, 14, ((336, 672), (672, 336), (672, 672)))
    assert grid.tokens(480, 640) == anyres_image_tokens(480, 640, 336, 14, grid.pinpoints) and grid.max_tiles == 4
    assert AnyresGrid.from_config({"vision_config": {"image_size": 336, "patch_size": 14}}) is None
