"""``lora-llava merge`` and ``report``: the commands that read a run folder."""

from __future__ import annotations

import argparse
import sys

__all__ = ["cmd_merge", "cmd_report", "merge_args", "report_args"]


def cmd_merge(args) -> int:
    """Merge a run folder's LoRA adapter into the unquantized base, add its projector and the vision tower, and write
    a model plain transformers and vLLM load (--format hf, the llava-hf layout) or the reference code loads
    (--format llava) or llama.cpp loads (--format gguf). Streams the base shard by shard; writes to a temporary
    folder and renames it at the end.
    """
    from ..export.merge import merge

    try:
        result = merge(args.run_dir, args.out, format=args.format, dtype=args.dtype, base=args.base,
                       from_dequantized=args.from_dequantized, overwrite=args.overwrite,
                       max_shard_size=int(args.max_shard_size * 1024**3) if args.max_shard_size else None,
                       gguf_quant=args.gguf_quant)
    except OSError as e:  # disk full, permissions: the partial export is already removed
        print(f"error: writing {args.out} failed ({e}); nothing was left at {args.out}", file=sys.stderr)
        return 1
    what = f"gguf, {args.gguf_quant}" if result.format == "gguf" else f"{result.format} layout, {args.dtype}"
    print(f"merged {result.merged_modules} LoRA modules; {result.bytes / 1e9:.2f} GB written to {result.out} ({what})")
    return 0


def merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a lora-llava run folder (train.output_dir)")
    p.add_argument("--out", required=True, help="folder to write the export to (must not exist, unless --overwrite)")
    p.add_argument("--format", choices=["hf", "llava", "gguf"], default="hf",
                   help="hf: llava-hf layout for transformers / vLLM (default); llava: the original LLaVA layout; "
                        "gguf: llama.cpp (a language-model GGUF + an mmproj GGUF)")
    p.add_argument("--gguf-quant", choices=["f16", "q8_0", "q4_k_m"], default="f16",
                   help="with --format gguf: the language model's type (q8_0 / q4_k_m through llama.cpp's quantizer, "
                        "which needs llama-cpp-python); the mmproj stays f16")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the export")
    p.add_argument("--base", help="local copy of the base checkpoint (replaces model.llava / model.llm of the recipe)")
    p.add_argument("--from-dequantized", action="store_true",
                   help="merge into the NF4-dequantized base weights (exactly what a QLoRA run trained against) "
                        "instead of the original bf16 weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max-shard-size", type=float, metavar="GB",
                   help="largest output shard (default: the size of the base's largest shard, which bounds memory)")


def cmd_report(args) -> int:
    """Print a run folder's summary (steps, epochs, final / min loss, tokens seen, throughput, peak GPU memory,
    wall time) and write its loss.png (loss and learning rate against step). Works on an unfinished run too, from
    its newest checkpoint."""
    from ..run.report import format_report, run_report, write_plot

    report = run_report(args.run_dir)
    plot = write_plot(args.run_dir)
    print(format_report(report))
    print(f"loss plot: {plot}")
    return 0


def report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a lora-llava run folder (train.output_dir)")
