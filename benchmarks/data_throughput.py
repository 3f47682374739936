"""CPU data-path throughput (lora-llava vs TRL's VLM collator) and padding efficiency of three batching schemes.

1. Samples/s of the whole CPU data path of LLaVA-1.5 fine-tuning at batch 16, both sides in one run on the same
   records and the same JPEG files: JPEG decode, CLIP preprocessing at 336 px (a local ``CLIPImageProcessor``, CLIP
   mean/std), Vicuna tokenization (the real Llama-2 tokenizer + ``<image>``/``<pad>``, 576 image tokens per image),
   collation. lora-llava = ``LlavaDataset`` (tokenization timed, uncached; a cached rebuild is timed on its own) +
   ``LlavaCollator`` (decode, pad-to-square with the CLIP mean, CLIP). TRL = ``DataCollatorForVisionLanguageModeling``
   with a ``LlavaProcessor`` whose chat template renders the vicuna_v1 prompt (it renders and tokenizes per batch),
   fed images decoded with PIL as a ``datasets`` Image column does; once with answer-only labels
   (``assistant_only_loss``, the labels lora-llava makes) and once with TRL's default labels. Median of 3 passes
   after one warm-up pass; a per-stage split of both follows.
2. Padding efficiency (real tokens / batch tokens) at batch 16 on a LLaVA-665K-like length mix (multi-turn image
   conversations, short image captions, ~30% long text-only conversations), tokenized for real: random batches,
   ``modality_length_groups`` batches (megabatch 16, and 128 = LLaVA-1.5's global batch), padding-free batches; all
   computed from the collator's output.

Texts are the real GPT-4 instruction data of the assets folder (``--assets``; default
``<repository>/../shared/assets/llava-samples``: ``coco2014_val_gpt4_qa_30x3.jsonl`` and LLaVA's two demo photos);
64 JPEGs of various sizes and aspect ratios are cut from its two photos into a temporary folder. Offline; a few
minutes on 2 cores. Run from the repository root:

    python -m benchmarks.data_throughput [--quick] [--threads 1] [--assets DIR]
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import random
import shutil
import statistics
import tempfile
from pathlib import Path

from ._shared.assets import DEFAULT_ASSETS, PHOTOS, missing_assets, read_qa
from ._shared.llava_inputs import CHAT_TEMPLATE, llava_processor, llava_tokenizer, trl_messages
from ._shared.machine import command_line, machine
from ._shared.timing import median_time

SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (640, 640), (1024, 768), (375, 500),
         (612, 612), (640, 360), (800, 533), (336, 448), (1280, 720), (300, 225), (640, 512), (512, 768))
BATCH = 16


def make_images(folder: Path, n: int, rng: random.Random, assets: Path) -> list[str]:
    """``n`` JPEGs cut from the real photos of ``assets``: random crops at the target aspect ratio, resized, COCO-like
    quality."""
    from PIL import Image

    photos = [Image.open(assets / p).convert("RGB") for p in PHOTOS]
    names = []
    for k in range(n):
        photo, (w, h) = photos[k % len(photos)], SIZES[k % len(SIZES)]
        scale = min(photo.width / w, photo.height / h) * rng.uniform(0.6, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x, y = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
        names.append(f"img_{k:03d}.jpg")
        photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC).save(folder / names[-1], quality=90)
    return names


def conversation(pairs: list[tuple[str, str]], image: str | None) -> dict:
    convs = []
    for j, (q, a) in enumerate(pairs):
        convs += [{"from": "human", "value": ("<image>\n" + q) if image and j == 0 else q}, {"from": "gpt", "value": a}]
    return {"conversations": convs, **({"image": image} if image else {})}


def image_records(qa: dict, images: list[str], n: int, rng: random.Random) -> list[dict]:
    """Image conversations of 1-3 real turns about one COCO image (all three kinds: conv, detail, complex)."""
    groups = list(qa.values())
    return [conversation(rng.sample(g, rng.randint(1, 3)), images[i % len(images)])
            for i, g in enumerate(rng.choice(groups) for _ in range(n))]


def length_mix(qa: dict, images: list[str], n: int, rng: random.Random) -> list[dict]:
    """45% image conversations, 25% short image captions, 30% long text-only conversations (4-14 turns)."""
    pairs = [p for g in qa.values() for p in g]
    captions = [a.split(". ")[0].rstrip(".") + "." for g in qa.values() for _, a in g[1:2]]
    out = image_records(qa, images, int(n * 0.45), rng)
    out += [conversation([("Provide a brief description of the given image.", rng.choice(captions))],
                         rng.choice(images)) for _ in range(int(n * 0.25))]
    out += [conversation(rng.sample(pairs, rng.randint(4, 14)), None) for _ in range(n - len(out))]
    rng.shuffle(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 samples, 512-sample length mix, 1 repeat")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and tokenizer threads (1 = one DataLoader worker, the default)")
    ap.add_argument("--samples", type=int, default=None, help="samples timed per pass (default 256, quick 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--assets", type=Path, default=DEFAULT_ASSETS,
                    help="folder with LLaVA's coco2014_val_gpt4_qa_30x3.jsonl, extreme_ironing.jpg and waterview.jpg "
                         "(default: <repository>/../shared/assets/llava-samples)")
    args = ap.parse_args()
    why = missing_assets(args.assets)
    if why:
        ap.error(f"--assets: {why}; give a folder that has them")
    n = args.samples or (64 if args.quick else 256)
    n -= n % BATCH
    repeats, mix_n = (1, 512) if args.quick else (3, 2000)
    # Set before the tokenizers library starts: its batch encoding would otherwise use every core.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.threads > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)

    import datasets
    import torch
    import transformers
    import trl
    from PIL import Image
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from lora_llava.data import LlavaCollator, LlavaDataset, modality_length_groups
    from lora_llava.data.images import expand_to_square
    from lora_llava.data.sampler import padding_efficiency
    from lora_llava.llava.constants import CLIP_MEAN

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="data_throughput."))
    atexit.register(shutil.rmtree, tmp, True)
    folder = tmp / "images"
    folder.mkdir()
    images = make_images(folder, 64, rng, args.assets)
    qa = read_qa(args.assets)
    tok = llava_tokenizer()
    image_token, pad = tok.convert_tokens_to_ids("<image>"), tok.pad_token_id
    processor = llava_processor(tok, chat_template=CHAT_TEMPLATE)
    clip = processor.image_processor
    print(f"command: {command_line(__spec__.name)}")
    print(f"machine: {machine()}; threads {args.threads}; python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"datasets {datasets.__version__}; image processor {type(clip).__name__}")

    # ---- 1. throughput -------------------------------------------------------------------------------------------
    records = image_records(qa, images, n, rng)
    kw = dict(image_token_id=image_token, num_image_tokens=576, image_folder=str(folder))
    build = lambda **extra: LlavaDataset.from_records(records, tok, "vicuna_v1", **kw, **extra)  # noqa: E731
    t_tok = median_time(lambda: build(cache_dir=False), repeats)
    cache = tmp / "cache"
    build(cache_dir=cache)  # writes the cache
    t_cached = median_time(lambda: build(cache_dir=cache), repeats)
    ds = build(cache_dir=False)
    collator = LlavaCollator(clip, pad, str(folder))
    batches = [list(range(s, s + BATCH)) for s in range(0, n, BATCH)]
    t_col = median_time(lambda: [collator([ds[i] for i in b]) for b in batches], repeats)

    def trl_examples(b: list[int]) -> list[dict]:
        out = []
        for i in b:
            with Image.open(folder / records[i]["image"]) as im:  # as a datasets Image column decodes
                im.load()
                img = im if im.mode == "RGB" else im.convert("RGB")
            out.append({"messages": trl_messages(records[i]), "images": [img]})
        return out

    trl_times = {}
    for name, answer_only in (("answer-only labels", True), ("default labels", False)):
        trl_col = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=answer_only)
        trl_times[name] = median_time(lambda c=trl_col: [c(trl_examples(b)) for b in batches], repeats)
    ours_b = collator([ds[i] for i in batches[0]])
    trl_aol = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)(trl_examples(batches[0]))
    same_targets = (ours_b["labels"] != -100).sum(1).tolist() == (trl_aol["labels"] != -100).sum(1).tolist()

    # Split of the time per stage, on the same files (one pass each, after the timed runs).
    def stage(fn) -> float:
        return median_time(fn, 1)

    fill = tuple(int(c * 255) for c in CLIP_MEAN)

    def decode(i):
        with Image.open(folder / records[i]["image"]) as im:
            im.load()
            return im if im.mode == "RGB" else im.convert("RGB")

    decoded = [decode(i) for i in range(n)]
    squares = [expand_to_square(im, fill) for im in decoded]
    t_decode = stage(lambda: [decode(i) for i in range(n)])
    t_pad = stage(lambda: [expand_to_square(im, fill) for im in decoded])
    t_clip_sq = stage(lambda: [clip(images=squares[b[0]:b[-1] + 1], return_tensors="pt") for b in batches])
    t_clip = stage(lambda: [clip(images=decoded[b[0]:b[-1] + 1], return_tensors="pt") for b in batches])
    t_rows = stage(lambda: [collator([dict(ds[i], image_files=[]) for i in b]) for b in batches])

    ours = n / (t_tok + t_col)
    ours_cached = n / (t_cached + t_col)
    trl_aol_sps, trl_def_sps = (n / trl_times[k] for k in ("answer-only labels", "default labels"))
    tokens = sum(ds["length"]) / n
    print(f"\n## 1. Full CPU data path, batch {BATCH}, {n} samples (1 image + 1-3 turns each, {tokens:.0f} "
          f"tokens/sample mean), median of {repeats} after a warm-up")
    print("| pipeline | s / pass | samples/s |\n| --- | --- | --- |")
    print(f"| lora-llava: LlavaDataset (uncached) + LlavaCollator | {t_tok + t_col:.2f} | {ours:.1f} |")
    print(f"| lora-llava: LlavaDataset (cache hit) + LlavaCollator | {t_cached + t_col:.2f} | {ours_cached:.1f} |")
    print(f"| TRL DataCollatorForVisionLanguageModeling, answer-only labels | {trl_times['answer-only labels']:.2f} "
          f"| {trl_aol_sps:.1f} |")
    print(f"| TRL DataCollatorForVisionLanguageModeling, default labels | {trl_times['default labels']:.2f} "
          f"| {trl_def_sps:.1f} |")
    print(f"ratio lora-llava / TRL (answer-only): {ours / trl_aol_sps:.2f}x uncached, {ours_cached / trl_aol_sps:.2f}x "
          f"cached; vs TRL default labels: {ours / trl_def_sps:.2f}x, {ours_cached / trl_def_sps:.2f}x")
    print(f"check: pixel_values {tuple(ours_b['pixel_values'].shape)} vs {tuple(trl_aol['pixel_values'].shape)}; "
          f"supervised tokens per row identical to TRL answer-only: {same_targets}")
    ms = lambda t: 1000 * t / n  # noqa: E731
    print("\nper-sample split (ms/sample; stages timed alone, one pass)")
    print("| stage | lora-llava | TRL |\n| --- | --- | --- |")
    print(f"| JPEG decode | {ms(t_decode):.2f} | {ms(t_decode):.2f} |")
    print(f"| pad to square (CLIP mean) | {ms(t_pad):.2f} | - |")
    print(f"| CLIP preprocess 336 px (ours: padded squares) | {ms(t_clip_sq):.2f} | {ms(t_clip):.2f} |")
    t_trl_text = trl_times["default labels"] - t_decode - t_clip
    print(f"| tokenize (ours: LlavaDataset build; TRL: chat template + tokenize + pad = the collator's rest) | "
          f"{ms(t_tok):.2f} (cached {ms(t_cached):.2f}) | {ms(t_trl_text):.2f} |")
    print(f"| answer-only labels (TRL: return_assistant_tokens_mask) | (in tokenize) | "
          f"{ms(trl_times['answer-only labels'] - trl_times['default labels']):.2f} |")
    print(f"| rows from Arrow + pad/stack tensors | {ms(t_rows):.2f} | (in tokenize) |")
    print(f"| total (timed end to end) | {ms(t_tok + t_col):.2f} | {ms(trl_times['answer-only labels']):.2f} |")

    # ---- 2. padding efficiency -------------------------------------------------------------------------------------
    mix = length_mix(qa, images, mix_n, rng)
    mds = LlavaDataset.from_records(mix, tok, "vicuna_v1", cache_dir=False, max_length=2048, **kw)
    rows = [dict(r, image_files=[]) for r in mds.rows]  # images play no part in padding: do not decode them
    lengths, has_image = list(mds.rows["length"]), list(mds.rows["has_image"])
    padded, free = LlavaCollator(clip, pad), LlavaCollator(clip, pad, padding_free=True)

    def efficiency(order: list[int], padding_free: bool = False) -> tuple[float, float]:
        real = total = 0
        for s in range(0, len(order), BATCH):
            feats = [rows[i] for i in order[s:s + BATCH]]
            out = (free if padding_free else padded)(feats)
            real += int((out["input_ids"] != pad).sum())  # no sample holds <pad>: non-pad = real tokens
            total += out["input_ids"].numel()
        return real / total, total / -(-len(order) // BATCH)

    epochs = range(3)
    schemes = {
        "random batches": [torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed + e)).tolist()
                           for e in epochs],
        "modality-grouped, megabatch 16 (grad_accum 1)": [
            modality_length_groups(lengths, has_image, BATCH, 1, seed=args.seed, epoch=e) for e in epochs],
        "modality-grouped, megabatch 128 (grad_accum 8)": [
            modality_length_groups(lengths, has_image, BATCH, 1, seed=args.seed, epoch=e,
                                   gradient_accumulation_steps=8) for e in epochs],
        "padding-free (one packed row per batch)": [list(range(len(rows)))],
    }
    n_img = sum(has_image)
    print(f"\n## 2. Padding efficiency, batch {BATCH}, {len(rows)} samples: {n_img} with an image "
          f"(median {statistics.median(c for c, h in zip(lengths, has_image) if h):.0f} tokens), {len(rows) - n_img} "
          f"text-only (median {statistics.median(c for c, h in zip(lengths, has_image) if not h):.0f}); "
          f"mean of {len(epochs)} epochs")
    print("| batching | real / batch tokens | batch tokens / step |\n| --- | --- | --- |")
    for name, orders in schemes.items():
        results = [efficiency(o, padding_free=name.startswith("padding-free")) for o in orders]
        if not name.startswith("padding-free"):
            assert all(abs(r[0] - padding_efficiency(o, lengths, BATCH)) < 1e-9 for r, o in zip(results, orders))
        print(f"| {name} | {statistics.mean(r[0] for r in results):.3f} | "
              f"{statistics.mean(r[1] for r in results):,.0f} |")


if __name__ == "__main__":
    main()
