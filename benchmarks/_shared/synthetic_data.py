"""LLaVA-format training records at target token counts, with random JPEGs, for the train-step benchmark.

Stage 2: multi-turn image conversations whose token counts (576 image tokens included, measured with lora-llava's
tokenizer path) spread from ~650 to the sequence length (60% up to 900, 30% up to 1,400, 10% beyond; the first one at
the full length so that the peak covers it), 10% text-only conversations. Stage 1: image + one short caption
(~600-650 tokens, the plain template). Texts: the real GPT-4 instruction data of the assets folder when given, else
generated sentences. Images: smooth noise, 300x225 to 1280x720.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

from .assets import read_qa

STAGE1_PROMPTS = ("Describe the image concisely.", "Provide a brief description of the given image.",
                  "Share a concise interpretation of the image provided.", "Summarize the visual content of the image.")
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (640, 640), (1024, 768), (375, 500), (612, 612),
               (640, 360), (800, 533), (336, 448), (1280, 720), (300, 225), (640, 512))


def sentences(rng: random.Random, assets: Path | None) -> list[tuple[str, str]]:
    """(question, answer) pairs: the real GPT-4 instruction data of ``assets`` when given, else generated
    sentences."""
    if assets is not None:
        return [p for g in read_qa(assets).values() for p in g]
    words = ("the a man woman dog cat street table window red blue green large small two three people car tree "
             "building sign water sky standing sitting holding next to near behind in on with of and is are "
             "picture image scene shows appears likely because while background foreground").split()

    def sentence(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k)).capitalize() + "."

    return [(sentence(rng.randint(6, 14)).rstrip(".") + "?", " ".join(sentence(rng.randint(8, 22))
                                                                      for _ in range(rng.randint(2, 9))))
            for _ in range(200)]


def make_data(folder: Path, stage: int, n: int, seq_len: int, seed: int, assets: Path | None = None) -> dict:
    """Write ``n`` LLaVA-format records (``records.json``) and their JPEGs to ``folder`` (see the module docstring).
    Returns the sample count and token-count statistics."""
    import numpy as np
    from PIL import Image

    from lora_llava.data import Sample, encode_sample, get_template

    from .llava_inputs import llava_tokenizer

    rng = random.Random(seed * 10 + stage)
    nrng = np.random.default_rng(seed * 10 + stage)
    tok = llava_tokenizer()
    template = get_template("plain" if stage == 1 else "vicuna_v1")
    image_id = tok.convert_tokens_to_ids("<image>")

    def length(turns: list[tuple[str, str]], image: bool) -> int:
        return len(encode_sample(Sample("x", turns, ["x"] if image else []), tok, template, image_id, 576).input_ids)

    pairs = sentences(rng, assets)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    n_text = 0 if stage == 1 else max(1, round(0.1 * n))
    records, lengths = [], []
    for k in range(n):
        image = k >= n_text
        if stage == 1:
            caption = rng.choice(pairs)[1].split(". ")[0].rstrip(".") + "."
            turns = [("human", "<image>\n" + rng.choice(STAGE1_PROMPTS)), ("gpt", caption)]
        else:
            u = rng.random()
            lo, hi = (650, 900) if u < 0.6 else (900, 1400) if u < 0.9 else (1400, seq_len)
            target = seq_len - 8 if k == n_text else rng.randint(min(lo, seq_len - 64), min(hi, seq_len - 8))
            if not image:
                target = rng.randint(min(200, seq_len // 2), seq_len - 8)
            turns = []
            for q, a in rng.sample(pairs, len(pairs)):
                turns += [("human", ("<image>\n" + q) if image and not turns else q), ("gpt", a)]
                if length(turns, image) >= target:
                    words = a.split()
                    lo_w, hi_w = 1, len(words)  # the longest answer prefix that keeps the sample <= target
                    while lo_w < hi_w:
                        mid = (lo_w + hi_w + 1) // 2
                        turns[-1] = ("gpt", " ".join(words[:mid]))
                        lo_w, hi_w = (mid, hi_w) if length(turns, image) <= target else (lo_w, mid - 1)
                    turns[-1] = ("gpt", " ".join(words[:lo_w]))
                    break
        rec = {"id": f"s{stage}-{k}", "conversations": [{"from": r, "value": v} for r, v in turns]}
        if image:
            w, h = IMAGE_SIZES[k % len(IMAGE_SIZES)]
            noise = nrng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
            rec["image"] = f"images/s{stage}_{k:04d}.jpg"
            Image.fromarray(noise).resize((w, h), Image.BICUBIC).save(folder / rec["image"], quality=90)
        records.append(rec)
        lengths.append(length(turns, image))
    rng.shuffle(records)
    (folder / "records.json").write_text(json.dumps(records))
    return {"n": n, "text_only": n_text, "min": min(lengths), "median": statistics.median(lengths),
            "max": max(lengths), "tokens": sum(lengths)}
