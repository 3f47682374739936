"""Annotated images, the teacher's only view of them: captions and labelled boxes normalised to 0-1.

Two inputs are read: COCO-style ``captions_*.json`` + ``instances_*.json`` (boxes ``[x, y, w, h]`` in pixels, turned
into ``[x1, y1, x2, y2]`` fractions of the image's width and height), and a simple JSONL with one image a line:
``{"image": "a.jpg", "captions": ["..."], "boxes": [{"label": "dog", "bbox": [x1, y1, x2, y2]}]}`` (already 0-1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..files import iter_jsonl, read_json

__all__ = ["Annotation", "Box", "read_annotations"]


@dataclasses.dataclass(frozen=True)
class Box:
    label: str
    bbox: tuple[float, float, float, float]
    """Top-left x, y and bottom-right x, y as fractions of the image's width and height."""


@dataclasses.dataclass
class Annotation:
    """One image: its path (relative to the image folder), its captions and its labelled boxes."""

    image: str
    captions: list[str]
    boxes: list[Box] = dataclasses.field(default_factory=list)


def _norm(v: float) -> float:
    return round(min(max(v, 0.0), 1.0), 3)


def _check_bbox(value: Any, where: str) -> tuple[float, float, float, float]:
    if (not isinstance(value, list) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise DataError(f"{where}: 'bbox' must be a list of 4 numbers [x1, y1, x2, y2], got {value!r}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not all(-1e-6 <= v <= 1 + 1e-6 for v in (x1, y1, x2, y2)):
        raise DataError(f"{where}: 'bbox' {value} is not normalised to 0-1 (divide by the image's width and height)")
    if x2 < x1 or y2 < y1:
        raise DataError(f"{where}: 'bbox' {value} is not [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2")
    return (_norm(x1), _norm(y1), _norm(x2), _norm(y2))


def _read_jsonl(path: Path) -> list[Annotation]:
    out = []
    for number, rec in iter_jsonl(path):
        where = f"{path}: line {number}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with 'image' and 'captions', got {type(rec).__name__}")
        image = rec.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: field 'image' must be a non-empty path string")
        captions = rec.get("captions")
        if isinstance(captions, str):
            captions = [captions]
        if (not isinstance(captions, list) or not captions
                or not all(isinstance(c, str) and c.strip() for c in captions)):
            raise DataError(f"{where}: field 'captions' must be a non-empty list of non-empty strings")
        boxes = rec.get("boxes", [])
        if not isinstance(boxes, list):
            raise DataError(f"{where}: field 'boxes' must be a list of {{'label', 'bbox'}} objects")
        parsed = []
        for j, box in enumerate(boxes):
            bwhere = f"{where}: boxes[{j}]"
            if not isinstance(box, dict) or not isinstance(box.get("label"), str) or not box["label"].strip():
                raise DataError(f"{bwhere}: expected an object with a non-empty string 'label' and a 'bbox'")
            parsed.append(Box(box["label"].strip(), _check_bbox(box.get("bbox"), bwhere)))
        out.append(Annotation(image, [c.strip() for c in captions], parsed))
    return out


def _coco_images(path: Path, data: dict) -> dict[int, dict]:
    images = data.get("images")
    if not isinstance(images, list):
        raise DataError(f"{path}: field 'images' must be a list (a COCO annotation file)")
    out = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        out[im["id"]] = im
    return out


def _read_coco(paths: list[tuple[Path, dict]]) -> list[Annotation]:
    captions: dict[Any, list[str]] = {}
    boxes: dict[Any, list[Box]] = {}
    images: dict[Any, dict] = {}
    have_captions = False
    for path, data in paths:
        images.update(_coco_images(path, data))
        anns = data.get("annotations")
        if not isinstance(anns, list):
            raise DataError(f"{path}: field 'annotations' must be a list")
        categories = {c.get("id"): c.get("name") for c in data.get("categories") or [] if isinstance(c, dict)}
        for i, ann in enumerate(anns):
            where = f"{path}: annotations[{i}]"
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise DataError(f"{where}: expected an object with 'image_id'")
            image_id = ann["image_id"]
            if image_id not in images:
                raise DataError(f"{where}: image_id {image_id!r} is not in the file's 'images'")
            if "caption" in ann:
                have_captions = True
                if not isinstance(ann["caption"], str) or not ann["caption"].strip():
                    raise DataError(f"{where}: 'caption' must be a non-empty string")
                captions.setdefault(image_id, []).append(ann["caption"].strip())
            elif "bbox" in ann:
                name = categories.get(ann.get("category_id"))
                if not isinstance(name, str):
                    raise DataError(f"{where}: category_id {ann.get('category_id')!r} is not in the file's "
                                    "'categories'")
                im = images[image_id]
                w, h = im.get("width"), im.get("height")
                if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
                    raise DataError(f"{path}: image {image_id!r} needs a positive 'width' and 'height' to "
                                    "normalise its boxes")
                b = ann["bbox"]
                if not isinstance(b, list) or len(b) != 4 or not all(isinstance(v, (int, float)) for v in b):
                    raise DataError(f"{where}: 'bbox' must be [x, y, width, height] in pixels, got {b!r}")
                x, y, bw, bh = b
                box = (_norm(x / w), _norm(y / h), _norm((x + bw) / w), _norm((y + bh) / h))
                boxes.setdefault(image_id, []).append(Box(name, box))
            else:
                raise DataError(f"{where}: neither 'caption' (a captions file) nor 'bbox' (an instances file)")
    if not have_captions:
        raise DataError(f"{', '.join(str(p) for p, _ in paths)}: no captions; give the COCO captions_*.json "
                        "(and instances_*.json for boxes)")
    return [Annotation(images[i]["file_name"], caps, boxes.get(i, []))
            for i, caps in sorted(captions.items(), key=lambda kv: str(images[kv[0]]["file_name"]))]


def read_annotations(paths: Iterable[str | Path]) -> list[Annotation]:
    """Every annotated image of the given files: JSONL files (one image a line) and COCO JSON files (captions and
    instances of the same images, merged by image id). Images without captions are left out (the teacher needs
    them); :class:`DataError` names the file, line or annotation index and field of anything malformed."""
    coco: list[tuple[Path, dict]] = []
    out: list[Annotation] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"{p}: annotation file not found")
        if p.suffix == ".jsonl":
            out += _read_jsonl(p)
        else:
            coco.append((p, read_json(p, dict, "a COCO annotation object with 'images' and 'annotations'")))
    if coco:
        out += _read_coco(coco)
    seen: set[str] = set()
    for a in out:
        if a.image in seen:
            raise DataError(f"image {a.image!r} is annotated twice; give each image once")
        seen.add(a.image)
    return out
