"""Padding-free attention kernels against padded sdpa on one batch: the same scored logits, so the padding-free speed
figures time an exact kernel.

flash-attn has no binary wheel, so the GPU run measures padding-free (``data.padding_free``: one row, ``position_ids``
restarting per sample, no attention mask) with kernels the image has: transformers' ``flex_attention`` (torch's
FlexAttention, compiled with Triton; the packed-sequence ``BlockMask`` skips the blocks between samples) and
``sdpa`` (a dense block-causal mask over the whole row). Both are exact attention, not approximations. This check
runs one batch through one model (eval mode, no dropout) padded with sdpa, padding-free with sdpa and with
flex_attention, and compares the logits at the supervised positions (relative L2 error). A negative control (the
packed row with positions running on, so its samples attend to each other) must differ, or the check could not tell.

    python -m benchmarks.gpu.flex_check [--shape tiny] [--batch 4] [--seq-len 1024] [--bits 4|16] [--json OUT]
        [--assets DIR]

On a GPU: bf16 compute, 4-bit NF4 by default (tolerance 2e-2); on the CPU: fp32 and 16-bit weights (bitsandbytes'
CPU 4-bit layers change their outputs after the first eval forward), tolerance 1e-4. Exit 1 when the check fails.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from .._shared.assets import DEFAULT_ASSETS, QA_FILE, missing_assets
from .._shared.checkpoint import write_checkpoint
from .._shared.synthetic_data import make_data
from .._shared.train_worker import set_language_model_attention

# (name, attention kernel of the language model, padding-free, positions restart per sample)
VARIANTS = (("padded, sdpa", "sdpa", False, True), ("padding-free, sdpa", "sdpa", True, True),
            ("padding-free, flex_attention", "flex_attention", True, True),
            # The negative control: the row's samples see each other (positions run on), which must differ.
            ("control: packed row, no sample boundaries", "sdpa", True, False))


def scored(model, inputs: dict):
    """The answer-only loss and the logits it scores (the supervised positions, in row order)."""
    import torch

    labels = inputs["labels"]
    targets = labels[:, 1:]
    mask = targets != -100
    keep = torch.nn.functional.pad(mask, (0, 1), value=False)
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**kwargs, use_cache=False, logits_to_keep=keep).logits.float()
    loss = torch.nn.functional.cross_entropy(logits, targets[mask])
    return float(loss), logits


def check(workdir: Path, shape: str, batch: int, seq_len: int, bits: int, assets: Path | None) -> dict:
    """The three losses of one batch and whether they agree."""
    import torch
    import transformers

    from lora_llava.config.recipe import recipe_from_dict
    from lora_llava.data import LlavaCollator
    from lora_llava.model.stage import build_model
    from lora_llava.train.sft import build_datasets

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    ckpt = workdir / f"ckpt-{shape}"
    write_checkpoint(ckpt, shape, dry_run=False)
    data = workdir / f"data-flex-b{batch}-seq{seq_len}"
    stats = make_data(data, 2, batch, seq_len, seed=1, assets=assets)
    records = json.loads((data / "records.json").read_text())
    raw = {"model": {"llava": str(ckpt), "attn_implementation": "sdpa", "dtype": "auto"},
           "quant": {"bits": bits}, "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0},
           "data": {"image_folder": str(data), "max_length": seq_len, "cache": False, "template": "auto"},
           "train": {"stage": 2, "output_dir": str(workdir / "run-flex"), "report_to": "none"}}
    recipe = recipe_from_dict(raw)
    torch.manual_seed(0)
    model, processor = build_model(recipe)
    model.eval()
    ds, _ = build_datasets(recipe, processor, model.config, train_records=records)
    features = [ds[i] for i in range(len(records))]
    dtype = model.get_input_embeddings().weight.dtype
    device = next(model.parameters()).device
    rows, ref = [], None
    for name, attention, padding_free, restart in VARIANTS:
        set_language_model_attention(model, attention)
        collator = LlavaCollator(processor.image_processor, processor.tokenizer.pad_token_id, str(data),
                                 padding_free=padding_free)
        inputs = {k: v.to(device) for k, v in collator(features).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        if not restart:
            inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1], device=device)[None]
        t = time.perf_counter()
        with torch.no_grad():
            loss, logits = scored(model, inputs)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        ref = logits if ref is None else ref
        rel = float((logits - ref).norm() / ref.norm()) if logits.shape == ref.shape else float("inf")
        rows.append({"variant": name, "attention": attention, "padding_free": padding_free, "loss": loss,
                     "logits_rel_diff": rel, "row_tokens": int(inputs["input_ids"].numel()),
                     "first_call_s": seconds})
    # bf16 operands through different kernels land between 1e-3 and 1e-2 (METHOD.md); fp32 far under 1e-4.
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    for r in rows:
        r["agrees"] = r["logits_rel_diff"] <= tol
    control = rows[-1]
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).removeprefix("torch."),
            "bits": bits, "shape": shape, "batch": batch, "seq_len": seq_len, "tolerance": tol,
            "sample_tokens": stats, "variants": rows,
            # The kernels agree, and the check can tell: the control (samples attending to each other) differs.
            "ok": all(r["agrees"] for r in rows[:-1]) and not control["agrees"]}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.flex_check", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "7b", "13b"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--bits", type=int, choices=[4, 16], help="default 4 on CUDA, 16 on the CPU")
    ap.add_argument("--workdir", type=Path, help="default: a temporary folder")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--assets", type=Path, help=f"folder with LLaVA's {QA_FILE} for the texts (default: the shared "
                                                "assets folder when it is there, else generated sentences)")
    args = ap.parse_args()
    if args.assets is not None and missing_assets(args.assets, (QA_FILE,)):
        ap.error(f"--assets: {missing_assets(args.assets, (QA_FILE,))}")
    assets = args.assets or (DEFAULT_ASSETS if missing_assets(DEFAULT_ASSETS, (QA_FILE,)) is None else None)
    import torch

    bits = args.bits or (4 if torch.cuda.is_available() else 16)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="flex_check."))
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    result = check(workdir, args.shape, args.batch, args.seq_len, bits, assets)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"flex check on {result['device']} ({result['dtype']}, {bits}-bit, shape {args.shape}, {args.batch} samples "
          f"of {result['sample_tokens']['min']}-{result['sample_tokens']['max']} tokens):")
    for r in result["variants"]:
        print(f"  {r['variant']:<42} loss {r['loss']:.6f}  logits rel diff {r['logits_rel_diff']:.2e}  row "
              f"tokens {r['row_tokens']:>6}  first call {r['first_call_s']:.1f} s  "
              f"{'agrees' if r['agrees'] else 'differs'}")
    print(f"flex check: {'OK' if result['ok'] else 'FAILED'}: the kernels must agree with padded sdpa and the "
          f"control must differ (tolerance {result['tolerance']:g}, relative L2 of the scored logits)")
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
