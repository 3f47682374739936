"""Step time of the answer-only loss (LM head on supervised positions only) against TRL's default loss.

TRL 1.x's SFTTrainer uses a fused LM head that scores only the supervised positions with a Triton kernel on a GPU,
but scores every position elsewhere. lora-llava's loss runs the LM head on the supervised positions on any device.
This script measures one optimizer-free training step (forward + backward) of both, side by side in one run, on the
demo's tiny LLaVA (real 32,064-token vocabulary), and prints the times and their ratio.

Run from the repository root:

    python -m benchmarks.loss_head [--batch 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    from trl import SFTTrainer

    from lora_llava.config.recipe import recipe_from_dict
    from lora_llava.data import LlavaCollator
    from lora_llava.demo import make_demo_model, make_shapes_data
    from lora_llava.model.stage import build_model
    from lora_llava.train.sft import build_datasets, sft_config
    from lora_llava.train.trainer import build_trainer

    tmp = Path(tempfile.mkdtemp())
    make_demo_model(tmp / "model", image_size=48)
    train_file, _ = make_shapes_data(tmp / "data", args.batch, 1, image_size=48)
    recipe = recipe_from_dict({
        "model": {"llava": str(tmp / "model")}, "quant": {"bits": 4}, "lora": {"r": 16, "lora_alpha": 32},
        "data": {"train": str(train_file), "image_folder": str(tmp / "data"), "max_length": 256},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 1, "gradient_checkpointing": False},
    })
    model, processor = build_model(recipe)
    train_ds, _ = build_datasets(recipe, processor, model.config)
    collator = LlavaCollator(processor.image_processor, processor.tokenizer.pad_token_id, recipe.data.image_folder)
    trainer = build_trainer(recipe, model, processor, train_ds.to_hf(), args=sft_config(recipe, torch.float32),
                            collator=collator)
    batch = collator([train_ds[i] for i in range(args.batch)])
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    model.train()

    def step(fn) -> float:
        times = []
        for _ in range(args.steps + 1):
            t = time.perf_counter()
            loss = fn(dict(batch))
            loss.backward()
            times.append(time.perf_counter() - t)
        return sorted(times[1:])[len(times[1:]) // 2], float(loss)

    ours, loss_ours = step(lambda b: trainer.compute_loss(model, b))
    trl, loss_trl = step(lambda b: SFTTrainer.compute_loss(trainer, model, b))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device cpu")
    print(f"batch {args.batch} x {batch['input_ids'].shape[1]} tokens, {n_targets} supervised targets, "
          f"vocabulary {model.config.text_config.vocab_size}")
    print(f"lora-llava answer-only loss: {ours * 1000:8.1f} ms/step (loss {loss_ours:.4f})")
    print(f"TRL SFTTrainer default loss: {trl * 1000:8.1f} ms/step (loss {loss_trl:.4f})")
    print(f"speed-up: {trl / ours:.1f}x")


if __name__ == "__main__":
    main()
