"""LLaVA-1.5's published training data: where each file the shipped recipes name comes from, so that a recipe whose
data is not downloaded yet says where to get it."""

from __future__ import annotations

from pathlib import Path

__all__ = ["PUBLISHED_DATA", "not_downloaded"]

PUBLISHED_DATA: dict[str, str] = {
    "blip_laion_cc_sbu_558k.json": (
        "LLaVA-1.5's stage-1 captions (558K); the json and images.zip are in "
        "https://huggingface.co/datasets/liuhaotian/LLaVA-Pretrain (unzip the images into the image folder)"),
    "llava_v1_5_mix665k.json": (
        "LLaVA-1.5's stage-2 mix (665K) from https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K; its "
        "images go under the image folder as coco/train2017, gqa/images, ocr_vqa/images, textvqa/train_images, "
        "vg/VG_100K and vg/VG_100K_2 (LLaVA's README, 'Visual Instruction Tuning', lists where each comes from)"),
    "chat.json": (
        "LLaVA v1's stage-1 captions (CC3M-595K); chat.json and images.zip are in "
        "https://huggingface.co/datasets/liuhaotian/LLaVA-CC3M-Pretrain-595K (unzip the images into the image folder),"
        " or make your own from image-caption pairs with `lora-llava data make-pretrain CAPTIONS --out chat.json`"),
    "llava_instruct_150k.json": (
        "LLaVA v1's stage-2 data (LLaVA-Instruct-158K) from https://huggingface.co/datasets/liuhaotian/"
        "LLaVA-Instruct-150K; its images are COCO train2017 (cocodataset.org), unpacked as the image folder"),
}
"""File name -> what it is and where to download it (from the LLaVA repository's training instructions)."""


def not_downloaded(path: str) -> str | None:
    """The download hint for a missing file the shipped recipes name, or None for any other file."""
    hint = PUBLISHED_DATA.get(Path(path).name)
    return None if hint is None else f"not downloaded yet: {hint}"
