"""The shared-assets folder: LLaVA's real GPT-4 instruction data (``coco2014_val_gpt4_qa_30x3.jsonl``: 30 COCO images x
3 kinds of question, conv / detail / complex) and LLaVA's two demo photos. It lives next to the repository, in
``../shared/assets/llava-samples``; the scripts take another folder with ``--assets``."""

from __future__ import annotations

import json
from pathlib import Path

from .machine import REPO_ROOT

DEFAULT_ASSETS = REPO_ROOT.parent / "shared" / "assets" / "llava-samples"
QA_FILE = "coco2014_val_gpt4_qa_30x3.jsonl"
PHOTOS = ("extreme_ironing.jpg", "waterview.jpg")


def missing_assets(folder: Path, names: tuple[str, ...] = (QA_FILE, *PHOTOS)) -> str | None:
    """Why ``folder`` cannot serve as the assets folder (a sentence naming what is missing), or None."""
    if not folder.is_dir():
        return f"the assets folder {folder} does not exist"
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        return f"the assets folder {folder} lacks {', '.join(missing)}"
    return None


def read_qa(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """The real GPT-4 (instruction, answer) pairs, grouped by COCO image (3 per image: conv, detail, complex)."""
    by_image: dict[str, list[tuple[str, str]]] = {}
    for line in (folder / QA_FILE).read_text().splitlines():
        r = json.loads(line)
        by_image.setdefault(r["id"], []).append((r["instruction"], r["output"]))
    return by_image
