"""From annotated images to a trained run: generate instruction data with a teacher LLM, mix it LLaVA-1.5 style,
check it, train on it.

    python examples/make_instruction_data.py                  # fully offline: a stand-in teacher on 127.0.0.1
    OPENAI_API_KEY=... python examples/make_instruction_data.py --teacher-url https://api.openai.com/v1 \\
        --teacher-model gpt-4o-mini --api-key-env OPENAI_API_KEY   # a real teacher (or vLLM / llama.cpp's server)

Steps (each is the ``lora-llava`` command printed before it runs):

1. a few generated images with COCO-style ``captions_demo.json`` + ``instances_demo.json`` (captions, boxes);
2. ``lora-llava data generate`` -> ``generated.jsonl`` (conversation, detail, reasoning), against the endpoint;
3. a VQA-style CSV (image, question, answer) + ``mix.yaml`` -> ``lora-llava data mix`` -> ``mix.json``;
4. ``lora-llava data check`` on the mix;
5. ``lora-llava sft`` for a few steps on the tiny demo model (lora_llava.demo), CPU-sized.

Without ``--teacher-url`` the teacher is a stand-in started by this script: an OpenAI-compatible chat server on
127.0.0.1 that writes its replies from the captions and boxes by rule, in the Question/===/Answer format. It shows
the plumbing, not the quality a real LLM gives.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from lora_llava.cli.main import main as lora_llava
from lora_llava.demo import make_demo_model

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
SHAPES = ("circle", "square")
SIZE = 48  # the demo model's image size: (48 / 8) ** 2 = 36 image tokens


def run(*args: str) -> None:
    print(f"\n$ lora-llava {shlex.join(args)}", flush=True)
    code = lora_llava(list(args))
    if code != 0:
        raise SystemExit(f"lora-llava {args[0]} exited with {code}")


def make_coco(folder: Path, n: int, seed: int = 0) -> list[dict]:
    """n images with one or two shapes each; COCO captions + instances files (bbox = [x, y, w, h] in pixels)."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, captions, instances, facts = [], [], [], []
    categories = [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]
    for i in range(n):
        im = Image.new("RGB", (SIZE + 16, SIZE), (245, 245, 245))
        draw = ImageDraw.Draw(im)
        shapes = []
        for j in range(rng.choice((1, 2))):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            x, y = 4 + 30 * j, rng.randint(2, 14)
            (draw.ellipse if shape == "circle" else draw.rectangle)((x, y, x + 24, y + 24), fill=COLOURS[colour])
            shapes.append((colour, shape))
            instances.append({"id": len(instances) + 1, "image_id": i, "category_id": SHAPES.index(shape) + 1,
                              "bbox": [x, y, 24, 24]})
        name = f"shapes_{i:03d}.png"
        im.save(folder / "images" / name)
        images.append({"id": i, "file_name": name, "width": SIZE + 16, "height": SIZE})
        things = " and ".join(f"a {c} {s}" for c, s in shapes)
        for text in (f"A picture of {things}.", f"{things.capitalize()} on a light grey background.",
                     f"A simple drawing showing {things}."):
            captions.append({"id": len(captions) + 1, "image_id": i, "caption": text})
        facts.append({"image": name, "shapes": shapes})
    (folder / "captions_demo.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (folder / "instances_demo.json").write_text(json.dumps({"images": images, "annotations": instances,
                                                            "categories": categories}))
    return facts


def stand_in_reply(system: str, context: str) -> str:
    """A rule-based 'teacher' reply from the image's context (first caption, box lines)."""
    caption = context.splitlines()[0]
    things = caption.removeprefix("A picture of ").rstrip(".")
    boxes = re.findall(r"^(\w+): \[([\d., ]+)\]$", context, re.MULTILINE)
    if "Describe the image in detail" in system:
        where = "; ".join(f"a {label} on the {'left' if float(b.split(',')[0]) < 0.4 else 'right'}"
                          for label, b in boxes)
        return f"The image shows {things} on a plain light grey background: {where}. Nothing else is in view."
    if "Ask one plausible question" in system:
        return (f"Question:\nWhat makes this image easy to describe?\n===\nAnswer:\nIt contains only {things} "
                "on a plain background, so every object stands out by its colour and shape.")
    n = len(things.split(" and "))
    return (f"Question:\nWhat is in the image?\n===\nAnswer:\n{things.capitalize()}.\n===\n"
            f"Question:\nHow many shapes are there?\n===\nAnswer:\n{'One' if n == 1 else 'Two'}.\n===")


def start_stand_in_teacher() -> tuple[str, ThreadingHTTPServer]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            messages = body["messages"]
            text = stand_in_reply(messages[0]["content"], messages[-1]["content"])
            reply = json.dumps({"object": "chat.completion", "model": body["model"], "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": sum(len(m["content"].split()) for m in messages),
                          "completion_tokens": len(text.split())}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-url", help="OpenAI-compatible endpoint (default: a stand-in on 127.0.0.1)")
    parser.add_argument("--teacher-model", default="stand-in")
    parser.add_argument("--api-key-env", help="environment variable holding the endpoint's key")
    parser.add_argument("--images", type=int, default=12, help="annotated images to make (default 12)")
    parser.add_argument("--steps", type=int, default=10, help="sft steps on the tiny demo model (0: no training)")
    parser.add_argument("--out", type=Path, default=Path("runs/make_instruction_data"))
    args = parser.parse_args()
    data = args.out / "data"

    facts = make_coco(data, args.images)
    url, server = (args.teacher_url, None) if args.teacher_url else start_stand_in_teacher()
    try:
        key = ["--api-key-env", args.api_key_env] if args.api_key_env else []
        run("data", "generate", str(data / "captions_demo.json"), str(data / "instances_demo.json"),
            "--image-folder", str(data / "images"), "--kind", "all", "--out", str(data / "generated.jsonl"),
            "--teacher-url", url, "--teacher-model", args.teacher_model, "--concurrency", "4", *key)
    finally:
        if server:
            server.shutdown()

    # Short-answer data the way LLaVA-1.5 mixed VQA sets in: one CSV row per question.
    rows = ["image,question,answer"]
    for f in facts:
        rows.append(f"{f['image']},What colour is the {f['shapes'][0][1]}?,{f['shapes'][0][0]}")
        rows.append(f"{f['image']},How many shapes are there?,{len(f['shapes'])}")
    (data / "vqa.csv").write_text("\n".join(rows) + "\n")
    spec = {"seed": 0, "image_folder": "images", "sources": [
        {"name": "generated", "format": "llava", "path": "generated.jsonl"},
        {"name": "vqa", "format": "qa", "path": "vqa.csv", "ratio": 1.0},
    ]}
    (data / "mix.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run("data", "mix", str(data / "mix.yaml"), "--out", str(data / "mix.json"))
    run("data", "check", str(data / "mix.json"), "--image-folder", str(data / "images"), "--max-length", "256",
        "--image-tokens", str((SIZE // 8) ** 2))

    if args.steps <= 0:
        return
    model = args.out / "tiny-model"
    if not (model / "config.json").exists():
        make_demo_model(model, image_size=SIZE)
    recipe = {
        "model": {"llava": str(model)}, "quant": {"bits": 4}, "lora": {"r": 8, "lora_alpha": 16},
        "data": {"train": str(data / "mix.json"), "image_folder": str(data / "images"), "template": "vicuna_v1",
                 "max_length": 256},
        "train": {"stage": 2, "output_dir": str(args.out / "run"), "max_steps": args.steps,
                  "per_device_train_batch_size": 4, "learning_rate": 3e-3, "projector_lr": 3e-3,
                  "logging_steps": 1, "activation_checkpointing": False, "dataloader_num_workers": 0},
    }
    (args.out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run("sft", str(args.out / "recipe.yaml"))


if __name__ == "__main__":
    main()
