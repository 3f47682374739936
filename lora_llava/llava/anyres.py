"""High-resolution images as LLaVA-1.5-HD / LLaVA-NeXT ("AnyRes") see them: a grid of tower-sized tiles chosen from a
set of resolutions (the *grid pinpoints*), plus one downscaled view of the whole image.

Everything here is arithmetic on sizes, so the data side can count an image's tokens from its header alone, and the
planner can bound the worst case, without decoding a pixel or loading a model. The count is the one transformers'
``LlavaNextProcessor`` inserts and ``LlavaNextForConditionalGeneration`` fills (tested against both):

* the base view: the tower's patch grid (``(size // patch) ** 2``, plus CLS with the ``full`` strategy);
* the grid: the tiles' patch grids side by side, with the rows and columns that only cover the padding around the
  resized image removed ("un-padding"), plus one newline embedding at the end of every remaining row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["DEFAULT_GRIDS", "AnyresGrid", "anyres_image_tokens", "best_resolution", "grid_pinpoints", "limit_tiles",
           "max_tiles", "worst_case_image_tokens"]

DEFAULT_GRIDS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2))
"""The grids (rows, columns of tiles) LLaVA-1.5-HD starts from: 2x2 (672x672 at 336 px) plus 1x2 and 2x1."""


def grid_pinpoints(tile: int, grids: Iterable[Sequence[int]] = DEFAULT_GRIDS) -> list[list[int]]:
    """``[height, width]`` resolutions of ``grids`` (rows, columns) of ``tile``-pixel tiles."""
    return [[int(r) * tile, int(c) * tile] for r, c in grids]


def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The ``(height, width)`` of ``pinpoints`` an image of this size is resized into: the one that keeps the most of
    its pixels (resized to fit, never enlarged past its own size), and among those the one that wastes the least."""
    if not pinpoints:
        raise ValueError("no grid resolutions (image_grid_pinpoints is empty)")
    best, kept_best, waste_best = None, -1, None
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - kept
        if kept > kept_best or (kept == kept_best and waste < waste_best):
            best, kept_best, waste_best = (int(h), int(w)), kept, waste
    return best


def _unpadded(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """Rows and columns of the grid's patch map that the resized image covers (the padding's are dropped)."""
    if width / height > cols / rows:
        covered = int(round(height * (cols / width), 7))
        rows -= (rows - covered) // 2 * 2
    else:
        covered = int(round(width * (rows / height), 7))
        cols -= (cols - covered) // 2 * 2
    return rows, cols


def anyres_image_tokens(height: int, width: int, tile: int, patch: int, pinpoints: Sequence[Sequence[int]],
                        strategy: str = "default") -> int:
    """Image tokens of one ``height`` x ``width`` image: base view + un-padded grid + one newline per grid row."""
    side = tile // patch
    base = side * side + (1 if strategy == "full" else 0)
    h, w = best_resolution(height, width, pinpoints)
    rows, cols = _unpadded(height, width, side * (h // tile), side * (w // tile))
    return base + rows * cols + rows


def max_tiles(pinpoints: Sequence[Sequence[int]], tile: int) -> int:
    """The most tiles one image can be cut into (the base view not counted)."""
    return max((h // tile) * (w // tile) for h, w in pinpoints)


def limit_tiles(pinpoints: Sequence[Sequence[int]], tile: int, limit: int) -> list[list[int]]:
    """The resolutions of at most ``limit`` tiles (``data.max_tiles``); raises ValueError when none is left."""
    kept = [[int(h), int(w)] for h, w in pinpoints if (h // tile) * (w // tile) <= limit]
    if not kept:
        raise ValueError(f"no grid resolution has at most {limit} tiles of {tile} px (smallest: "
                         f"{min((h // tile) * (w // tile) for h, w in pinpoints)})")
    return kept


def worst_case_image_tokens(tile: int, patch: int, pinpoints: Sequence[Sequence[int]],
                            strategy: str = "default") -> int:
    """The most image tokens any image can take: the largest grid with nothing un-padded (an image of its exact
    aspect ratio)."""
    side = tile // patch
    return max(anyres_image_tokens(h, w, tile, patch, pinpoints, strategy) for h, w in pinpoints
               ) if pinpoints else side * side


@dataclasses.dataclass(frozen=True)
class AnyresGrid:
    """How a model cuts images: ``tile`` px tiles of ``patch`` px patches, grid resolutions ``pinpoints``
    (``[height, width]`` pairs), the feature strategy. :meth:`tokens` counts one image's image tokens."""

    tile: int
    patch: int
    pinpoints: tuple[tuple[int, int], ...]
    strategy: str = "default"

    @classmethod
    def from_config(cls, config: Any) -> AnyresGrid | None:
        """The grid of a transformers ``LlavaNextConfig`` (or its dict); None for a config without grid resolutions
        (LLaVA-1.5: one 336-px view per image)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        pins = get("image_grid_pinpoints")
        if not pins:
            return None
        vision = get("vision_config")
        vget = vision.get if isinstance(vision, dict) else lambda k, d=None: getattr(vision, k, d)
        return cls(int(vget("image_size")), int(vget("patch_size")), tuple((int(h), int(w)) for h, w in pins),
                   get("vision_feature_select_strategy", "default") or "default")

    def tokens(self, height: int, width: int) -> int:
        """Image tokens of one ``height`` x ``width`` image."""
        return anyres_image_tokens(height, width, self.tile, self.patch, self.pinpoints, self.strategy)

    @property
    def worst_case(self) -> int:
        """The most image tokens one image can take."""
        return worst_case_image_tokens(self.tile, self.patch, self.pinpoints, self.strategy)

    @property
    def max_tiles(self) -> int:
        return max_tiles(self.pinpoints, self.tile)
