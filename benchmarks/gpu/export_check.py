"""A merged tiny export generates the same greedy tokens in bf16 on CUDA as on the CPU (issue 20; vLLM is not on the
GPU image, so this stands in for the serving check).

Steps: the demo's tiny random LLaVA (real Vicuna tokenizer, llava-hf layout) and its coloured-shapes data are written
to the work folder; a short QLoRA stage-2 run trains on them (``lora_llava.train.sft.train``: NF4 language model,
LoRA, trained projector); ``lora_llava.export.merge`` merges it into a bf16 llava-hf export; the export is loaded with
``lora_llava.infer.load.load_for_inference`` on each device / dtype and asked the held-out questions greedily (one
prompt at a time, so padding plays no part), tokenized by lora-llava's ``encode_prompt`` as in training. Compared:
the generated token ids (up to EOS or ``--new-tokens``) of each device against the first one, prompt by prompt, and
the answers of ``generate_answers`` (the user path).

    python -m benchmarks.gpu.export_check [--steps 200] [--questions 16] [--new-tokens 16] [--json OUT]

With CUDA the devices are cuda bf16, cpu bf16 and cpu fp32 (the first is the reference); without, cpu bf16 and cpu
fp32 (the dry run: the same code path). Exit 1 when cuda bf16 and cpu bf16 disagree on any prompt.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def train_and_merge(workdir: Path, steps: int) -> tuple[Path, dict, list[dict]]:
    """Tiny model + data, a short QLoRA run, its bf16 export; (export, timings, held-out records)."""
    from lora_llava.config.recipe import recipe_from_dict
    from lora_llava.demo import make_demo_model, make_shapes_data
    from lora_llava.export.merge import merge
    from lora_llava.train.sft import train

    t0 = time.perf_counter()
    model_dir = make_demo_model(workdir / "model", image_size=48)
    train_json, eval_json = make_shapes_data(workdir / "data", train_samples=max(64, 16 * steps), eval_samples=64,
                                             image_size=48, seed=0)
    t1 = time.perf_counter()
    raw = {"model": {"llava": str(model_dir), "attn_implementation": "sdpa"}, "quant": {"bits": 4},
           "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
           "data": {"train": str(train_json), "image_folder": str(workdir / "data"), "template": "vicuna_v1",
                    "max_length": 256, "cache": False},
           "train": {"stage": 2, "output_dir": str(workdir / "run"), "max_steps": steps,
                     "per_device_train_batch_size": 16, "learning_rate": 3e-3, "projector_lr": 3e-3,
                     "warmup_steps": min(10, steps // 5), "logging_steps": max(1, steps // 5),
                     "activation_checkpointing": False, "dataloader_num_workers": 0, "seed": 0}}
    result = train(recipe_from_dict(raw))
    t2 = time.perf_counter()
    export = merge(result.output_dir, workdir / "export", dtype="bf16", overwrite=True, progress=False).out
    t3 = time.perf_counter()
    losses = [round(x, 4) for x in result.losses]
    del result
    return export, {"prepare_s": t1 - t0, "train_s": t2 - t1, "merge_s": t3 - t2, "losses": losses}, \
        json.loads(Path(eval_json).read_text())


def greedy(export: Path, device: str, dtype: str, records: list[dict], folder: Path, new_tokens: int) -> dict:
    """Greedy token ids and ``generate_answers``'s answers of the export on ``device`` in ``dtype``."""
    import torch

    from lora_llava.data import encode_prompt, get_template, load_image
    from lora_llava.infer.generate import generate_answers, image_mean, prepare_pixels
    from lora_llava.infer.load import load_for_inference
    from lora_llava.llava.spec import config_image_token_id, config_image_tokens

    t = time.perf_counter()
    model, processor, template = load_for_inference(export, device=device, dtype=dtype)
    tok = processor.tokenizer
    tmpl = get_template(template)
    img_id, n_img = config_image_token_id(model.config), config_image_tokens(model.config)
    dev = next(model.parameters()).device
    tokens = []
    with torch.no_grad():
        for r in records:
            turns = [("human", r["conversations"][0]["value"])]
            ids = torch.tensor([encode_prompt(turns, tok, tmpl, img_id, n_img)], device=dev)
            pixels = prepare_pixels(processor, [load_image(folder, r["image"], "pad", image_mean(processor))], model)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                 max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            tokens.append(out[0, ids.shape[1]:].tolist())
    answers = generate_answers(model, processor, [[("human", r["conversations"][0]["value"])] for r in records],
                               [[r["image"]] for r in records], str(folder), template=template,
                               max_new_tokens=new_tokens)
    truth = [r["conversations"][1]["value"] for r in records]
    return {"device": device, "dtype": dtype, "weights_dtype": str(next(model.parameters()).dtype),
            "tokens": tokens, "answers": answers,
            "correct": sum(a.strip().lower().rstrip(".") == g.strip().lower().rstrip(".")
                           for a, g in zip(answers, truth)),
            "seconds": time.perf_counter() - t}


def compare(a: dict, b: dict) -> dict:
    """Prompts on which ``b`` generated exactly ``a``'s tokens, and where the others first differ."""
    same = [x == y for x, y in zip(a["tokens"], b["tokens"])]
    first = []
    for x, y in zip(a["tokens"], b["tokens"]):
        first.append(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None if x == y else min(len(x),
                                                                                                       len(y))))
    return {"against": f"{a['device']} {a['dtype']}", "what": f"{b['device']} {b['dtype']}",
            "same_tokens": sum(same), "prompts": len(same), "same_answers": sum(x == y for x, y in
                                                                                zip(a["answers"], b["answers"])),
            "first_difference": [i for i in first if i is not None]}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.export_check", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, help="training steps (default 200 with CUDA, 10 without)")
    ap.add_argument("--questions", type=int, default=16, help="held-out prompts")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--workdir", type=Path, help="default: a temporary folder")
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    steps = args.steps or (200 if cuda else 10)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="export_check."))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    export, timings, records = train_and_merge(workdir, steps)
    records = records[:args.questions]
    runs = [("cuda", "bfloat16")] if cuda else []
    runs += [("cpu", "bfloat16"), ("cpu", "float32")]
    outs = [greedy(export, d, t, records, workdir / "data", args.new_tokens) for d, t in runs]
    comparisons = [compare(outs[0], o) for o in outs[1:]]
    ok = comparisons[0]["same_tokens"] == comparisons[0]["prompts"]
    result = {"cuda": cuda, "device": torch.cuda.get_device_name() if cuda else "cpu", "steps": steps,
              "export": str(export), **timings, "runs": outs, "comparisons": comparisons,
              "ok": ok if cuda else None}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"export check: tiny QLoRA run of {steps} steps (loss {timings['losses'][0]} -> {timings['losses'][-1]}, "
          f"{timings['train_s']:.0f} s), merged to bf16 in {timings['merge_s']:.1f} s; {len(records)} held-out "
          f"prompts, greedy, up to {args.new_tokens} new tokens")
    for o in outs:
        print(f"  {o['device']} {o['dtype']}: {o['correct']}/{len(records)} answers right, {o['seconds']:.1f} s; "
              f"first answer {o['answers'][0]!r}")
    for c in comparisons:
        print(f"  {c['what']} vs {c['against']}: same tokens on {c['same_tokens']}/{c['prompts']} prompts, same "
              f"answers on {c['same_answers']}/{c['prompts']}" +
              (f"; first differing token positions {c['first_difference']}" if c["first_difference"] else ""))
    if not cuda:
        print("export check: no CUDA here, so cpu bf16 stands in for cuda bf16 (dry run of the code path)")
    raise SystemExit(0 if ok or not cuda else 1)


if __name__ == "__main__":
    main()
