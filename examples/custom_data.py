"""From a CSV of (image, question, answer) to a trained run, through the Python API.

    python examples/custom_data.py                       # makes a small demo CSV + images, trains the tiny demo model
    python examples/custom_data.py my.csv my_images/ --model llava-hf/llava-1.5-7b-hf --steps 500  # on a GPU

The CSV needs the columns ``image`` (a path relative to the image folder; empty for a text-only row), ``question``
and ``answer``; an ``id`` column is used when present. Each row becomes one LLaVA record
(``<image>\\n{question}`` -> ``{answer}``) and goes to ``lora_llava.train`` as Python records: no JSON file is written.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

from lora_llava import generate_answers, recipe_from_dict, train
from lora_llava.demo import make_demo_model


def records_from_csv(path: Path) -> list[dict]:
    """LLaVA records from a CSV; a row without a question or an answer is an error naming its line."""
    records = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"image", "question", "answer"} - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{path}: missing column(s) {sorted(missing)} (has {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            question, answer = (row["question"] or "").strip(), (row["answer"] or "").strip()
            if not question or not answer:
                raise SystemExit(f"{path}, line {line}: empty {'question' if not question else 'answer'}")
            image = (row["image"] or "").strip()
            record = {"id": row.get("id") or f"{path.stem}-{line}", "conversations": [
                {"from": "human", "value": f"<image>\n{question}" if image else question},
                {"from": "gpt", "value": answer}]}
            if image:
                record["image"] = image
            records.append(record)
    return records


def make_demo_csv(folder: Path, n: int = 240) -> Path:
    """A CSV of coloured shapes: which shape and colour is shown."""
    rng = random.Random(0)
    colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
    shapes = ("circle", "square")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = rng.choice(list(colours)), rng.choice(shapes)
        im = Image.new("RGB", (48, 40), (245, 245, 245))
        box = (8, 6, 40, 34)
        draw = ImageDraw.Draw(im)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colours[colour])
        im.save(folder / "images" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "question": "What is shown?",
                     "answer": f"A {colour} {shape}."})
    path = folder / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image", "question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", type=Path, help="CSV with image, question, answer columns")
    parser.add_argument("image_folder", nargs="?", type=Path, help="folder the image paths are relative to")
    parser.add_argument("--model", help="llava-hf checkpoint (default: a tiny random demo model, CPU-sized)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("runs/custom_data_example"))
    args = parser.parse_args()

    if args.csv is None:
        args.csv = make_demo_csv(args.out / "data")
        args.image_folder = args.out / "data" / "images"
    if args.image_folder is None:
        parser.error("give the image folder after the CSV")
    records = records_from_csv(args.csv)
    print(f"{len(records)} records from {args.csv}")

    model = args.model
    if model is None:
        model = args.out / "tiny-model"
        if not (model / "config.json").exists():
            make_demo_model(model, image_size=48)
    tiny = args.model is None
    recipe = recipe_from_dict({
        "model": {"llava": str(model)},
        "quant": {"bits": 4},
        "lora": {"r": 16 if tiny else 128, "lora_alpha": 32 if tiny else 256},
        "data": {"image_folder": str(args.image_folder), "template": "vicuna_v1", "max_length": 256 if tiny else 2048},
        "train": {"stage": 2, "output_dir": str(args.out / "run"), "max_steps": args.steps,
                  "per_device_train_batch_size": 16 if tiny else 4, "learning_rate": 3e-3 if tiny else 2e-4,
                  "projector_lr": 3e-3 if tiny else 2e-5, "logging_steps": 10,
                  "activation_checkpointing": not tiny},
    })
    result = train(recipe, train_records=records)
    print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; run folder {result.output_dir}")

    first = records[0]
    question = [("human", first["conversations"][0]["value"])]
    answer = generate_answers(result.model, result.processor, [question], [[first["image"]] if "image" in first
                                                                            else []],
                              str(args.image_folder), template="vicuna_v1", max_new_tokens=16)[0]
    print(f"{first['id']}: expected {first['conversations'][1]['value']!r}, answered {answer!r}")


if __name__ == "__main__":
    main()
