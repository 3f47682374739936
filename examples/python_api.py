"""Train from Python on your own records, then ask the trained model a question.

Run from the repository root:  python examples/python_api.py
It builds the demo's tiny random LLaVA (no download), writes a few hundred of your own records as a LLaVA JSON
file, trains stage 2 (QLoRA) for a few steps through the same code as `lora-llava sft`, and answers one question.
With a real checkpoint, set model.llava to e.g. llava-hf/llava-1.5-7b-hf and point the records at your images.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from lora_llava import generate_answers, load_recipe, train
from lora_llava.demo import make_demo_model

work = Path("runs/python_api_example")
images = work / "images"
images.mkdir(parents=True, exist_ok=True)

# 1. Your data, as Python records in the LLaVA format (here: plain colour swatches).
rng = random.Random(0)
colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220)}
records = []
for i in range(300):
    name = rng.choice(list(colours))
    Image.new("RGB", (40, 32), colours[name]).save(images / f"{i}.png")
    records.append({"id": str(i), "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich colour is this swatch?"},
        {"from": "gpt", "value": f"It is {name}."}]})
(work / "train.json").write_text(json.dumps(records))

# 2. A model: the demo's tiny random LLaVA in the llava-hf layout.
model_dir = work / "model"
if not (model_dir / "config.json").exists():
    make_demo_model(model_dir, image_size=32)

# 3. A recipe: start from the demo recipe and override what differs.
recipe = load_recipe("recipes/demo.yaml", [
    f"model.llava={model_dir}", f"data.train={work / 'train.json'}", "data.eval=[]", f"data.image_folder={images}",
    f"train.output_dir={work / 'run'}", "train.max_steps=60", "train.logging_steps=10",
])
result = train(recipe)
print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; run folder {result.output_dir}")

# 4. Ask the trained model (same tokenization as training).
Image.new("RGB", (40, 32), colours["green"]).save(images / "question.png")
answer = generate_answers(result.model, result.processor, [[("human", "<image>\nWhich colour is this swatch?")]],
                          [["question.png"]], str(images), template="vicuna_v1", max_new_tokens=8)[0]
print(f"answer for a green swatch: {answer!r}")
