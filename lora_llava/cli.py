"""The ``lora-llava`` command: a table of subcommands, each a thin call into the library.

Exit codes: 0 success, 1 the work failed (a bad data record, a failed run), 2 the command or recipe is wrong.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

from . import __version__
from .cli_inference import chat_args, cmd_chat, cmd_generate, generate_args

logger = logging.getLogger("lora_llava")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("lora_llava").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # Library chatter that says nothing a lora-llava user can act on.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        warnings.filterwarnings("ignore", module=r"(torch|transformers|peft|trl|bitsandbytes|accelerate)(\..*)?")


def _load(args, check_files: bool = True):
    """The recipe named on the command line, or None after printing every problem (exit code 2)."""
    from .recipe import RecipeError, load_recipe

    try:
        return load_recipe(args.recipe, args.overrides, check_files=check_files)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def cmd_validate(args) -> int:
    """Check a recipe without loading any weights; print it resolved."""
    if args.keys:
        from .recipe import SECTIONS, section_keys

        for name in SECTIONS:
            print(f"{name}:")
            for key, typ, default, origin in section_keys(name):
                print(f"  {key}: {typ} = {default!r}  [{origin}]")
        return 0
    if args.recipe is None:
        print("error: validate needs a RECIPE (or --keys)", file=sys.stderr)
        return 2
    recipe = _load(args)
    if recipe is None:
        return 2
    if not recipe.data.train:
        print(f"error: recipe {args.recipe}: data.train: no training data given", file=sys.stderr)
        return 2
    print(recipe.to_yaml(), end="")
    print(f"# {args.recipe}: OK (stage {recipe.train.stage}, template {recipe.template}, {recipe.quant.bits}-bit)")
    return 0


def cmd_sft(args) -> int:
    """Train: stage 1 (projector alignment) or stage 2 (LoRA + projector), as the recipe says."""
    recipe = _load(args)
    if recipe is None:
        return 2
    if not recipe.data.train:
        print(f"error: recipe {args.recipe}: data.train: no training data given (LLaVA JSON / JSONL files or Hugging "
              "Face datasets)", file=sys.stderr)
        return 2
    from .data import DataError
    from .distributed import LaunchError
    from .modeling import ModelError
    from .training import train

    try:
        result = train(recipe, resume=args.resume)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not result.main_process:
        return 0
    losses = result.losses
    if losses:
        print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} logged steps")
    print(f"run folder: {result.output_dir}")
    if recipe.demo is not None and recipe.data.eval:
        from .demo import evaluate_demo

        metrics = evaluate_demo(result.model, result.processor, recipe.data.eval[0], recipe.data.image_folder,
                                template=recipe.template, image_aspect_ratio=recipe.data.image_aspect_ratio)
        for ex in metrics["examples"][:3]:
            print(f"  {ex['id']}: expected {ex['expected']!r}, answered {ex['answer']!r}")
        print(f"held-out accuracy: {metrics['accuracy']:.3f} ({metrics['correct']}/{metrics['total']}, "
              f"colour and shape both right; chance is 1/12)")
    return 0


def cmd_plan(args) -> int:
    """Estimate the peak GPU memory of a recipe from config shapes alone (no weights, no GPU needed).

    Exit code 0 when it fits the GPU, 1 when it does not (the knobs that would make it fit are listed), 2 on a bad
    recipe or unknown model shapes.
    """
    recipe = _load(args, check_files=False)
    if recipe is None:
        return 2
    import torch

    from .planner import GiB, PlanError, format_plan, plan, suggestions

    if args.gpu_memory is not None:
        gb, name = args.gpu_memory, "the given GPU"
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gb, name = props.total_memory / GiB, props.name
    else:
        gb, name = 24.0, "an assumed consumer card (no GPU here; pass --gpu-memory)"
    try:
        estimate = plan(recipe, gb, seq_len=args.seq_len)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(recipe, estimate, args.recipe, name))
    if estimate.fits:
        return 0
    fixes = [(o, p) for o, p in suggestions(recipe, gb, seq_len=args.seq_len) if p.fits]
    if fixes:
        print("these overrides would make it fit:")
        for overrides, p in fixes:
            print(f"  {overrides}   (needs {p.needed / GiB:.1f} GiB)")
    else:
        print("none of the knobs (alone or all together) makes it fit; a larger GPU or a smaller model is needed")
    return 1


def cmd_merge(args) -> int:
    """Merge a run folder's LoRA adapter into the unquantized base, add its projector and the vision tower, and write
    a model plain transformers and vLLM load (--format hf, the llava-hf layout) or the reference code loads
    (--format llava). Streams the base shard by shard; writes to a temporary folder and renames it at the end.
    """
    from .export import merge
    from .loading import ModelError
    from .recipe import RecipeError

    try:
        result = merge(args.run_dir, args.out, format=args.format, dtype=args.dtype, base=args.base,
                       from_dequantized=args.from_dequantized, overwrite=args.overwrite,
                       max_shard_size=int(args.max_shard_size * 1024**3) if args.max_shard_size else None)
    except (ModelError, RecipeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: the partial export is already removed
        print(f"error: writing {args.out} failed ({e}); nothing was left at {args.out}", file=sys.stderr)
        return 1
    print(f"merged {result.merged_modules} LoRA modules; {result.bytes / 1e9:.2f} GB written to {result.out} "
          f"({result.format} layout, {args.dtype})")
    return 0


def cmd_report(args) -> int:
    """Print a run folder's summary (steps, epochs, final / min loss, tokens seen, throughput, peak GPU memory,
    wall time) and write its loss.png (loss and learning rate against step). Works on an unfinished run too, from
    its newest checkpoint."""
    from .report import ReportError, format_report, run_report, write_plot

    try:
        report = run_report(args.run_dir)
        plot = write_plot(args.run_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"loss plot: {plot}")
    return 0


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a lora-llava run folder (train.output_dir)")
    p.add_argument("--out", required=True, help="folder to write the export to (must not exist, unless --overwrite)")
    p.add_argument("--format", choices=["hf", "llava"], default="hf",
                   help="hf: llava-hf layout for transformers / vLLM (default); llava: the original LLaVA layout")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the export")
    p.add_argument("--base", help="local copy of the base checkpoint (replaces model.llava / model.llm of the recipe)")
    p.add_argument("--from-dequantized", action="store_true",
                   help="merge into the NF4-dequantized base weights (exactly what a QLoRA run trained against) "
                        "instead of the original bf16 weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max-shard-size", type=float, metavar="GB",
                   help="largest output shard (default: the size of the base's largest shard, which bounds memory)")


def _plan_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="GPU memory in GiB (default: the GPU here, else 24)")
    p.add_argument("--seq-len", type=int, metavar="N",
                   help="plan for samples of N tokens instead of data.max_length (e.g. ~650 for stage-1 captions)")


def cmd_data(args) -> int:
    """Dataset tools; ``lora-llava data check --help`` for the one there is."""
    print("error: data needs a subcommand: check", file=sys.stderr)
    return 2


def cmd_data_check(args) -> int:
    """Check every record of LLaVA JSON / JSONL data the way training reads it, and list every problem.

    Checked: the schema (conversations alternating human/gpt, non-empty string values), the images (under the
    image folder, present, decodable), '<image>' tags against images, and token lengths with the training
    tokenization (template, tokenizer, image tokens, max_length), so truncated and dropped counts are training's.
    Exit code 0 when every record is usable, 1 when any is bad (all are listed), 2 on a bad command.
    """
    from .data.check import CheckUsageError, check_data

    try:
        report = check_data(args.data, args.image_folder, template=args.template, tokenizer=args.tokenizer,
                            max_length=args.max_length, num_image_tokens=args.image_tokens, dump=args.dump,
                            decode_images=not args.no_images_decode, workers=args.workers, progress=None)
    except CheckUsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


def _data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser("check", help="check every record of a dataset; exit 1 if any is bad",
                       description=cmd_data_check.__doc__)
    c.set_defaults(func=cmd_data_check)
    c.add_argument("data", nargs="+", metavar="DATA", help="LLaVA JSON (a list) or JSONL files")
    c.add_argument("--image-folder", required=True, metavar="DIR", help="folder the records' image paths are under")
    # No choices=: listing the templates would import the data package (and torch) for every `lora-llava --help`.
    c.add_argument("--template", default="vicuna_v1",
                   help="conversation template: vicuna_v1 (default), plain (stage-1 caption data), llava_v0")
    c.add_argument("--tokenizer", metavar="PATH",
                   help="local tokenizer folder (default: the shipped Vicuna-v1.5 tokenizer); <image> and <pad> "
                        "are added as llava-hf has them")
    c.add_argument("--max-length", type=int, default=2048, metavar="N",
                   help="data.max_length of training (default 2048)")
    c.add_argument("--image-tokens", type=int, default=576, metavar="N",
                   help="tokens per image (default 576: CLIP ViT-L/14 at 336 px)")
    c.add_argument("--dump", metavar="FILE.jsonl",
                   help="write {id, input_ids, labels} of every record that would train, as training sees it")
    c.add_argument("--no-images-decode", action="store_true",
                   help="only check that images exist (fast); by default each one is decoded")
    c.add_argument("--workers", type=int, default=1, metavar="N", help="processes decoding images (default 1)")


def _sft_args(p: argparse.ArgumentParser) -> None:
    _recipe_args(p)
    p.add_argument("--resume", metavar="auto|CHECKPOINT",
                   help="continue a run: 'auto' = the newest complete checkpoint in train.output_dir (or start fresh "
                        "when there is none), or a checkpoint folder; weights, optimizer, scheduler, RNG and data "
                        "order are restored")


def _recipe_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("recipe", nargs="?" if optional else None, help="path to a YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override recipe values, e.g. train.max_steps=50 lora.r=16")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None]]] = {
    "sft": (cmd_sft, "train a recipe (stage 1 or stage 2)", _sft_args),
    "data": (cmd_data, "dataset tools: 'data check' validates every record, dumps label masks", _data_args),
    "plan": (cmd_plan, "estimate peak GPU memory of a recipe and whether it fits", _plan_args),
    "report": (cmd_report, "summarise a run folder (steps, losses, tokens, throughput) and redraw loss.png",
               lambda p: p.add_argument("run_dir", help="a lora-llava run folder (train.output_dir)")),
    "chat": (cmd_chat, "chat about an image with a run or checkpoint, answers streamed", chat_args),
    "generate": (cmd_generate, "answer a LLaVA eval question file in batches (greedy)", generate_args),
    "merge": (cmd_merge, "merge a run's LoRA adapter and projector into a model transformers / vLLM load", _merge_args),
    "validate": (
        cmd_validate,
        "check a recipe and print it resolved; loads no weights",
        lambda p: (_recipe_args(p, optional=True),
                   p.add_argument("--keys", action="store_true", help="list every valid key of every section")),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-llava",
        description="Fine-tune LLaVA-1.5 with QLoRA: stage 1 (projector alignment) and stage 2 (visual instruction "
                    "tuning) on one GPU.",
        epilog="Example: lora-llava sft recipes/demo.yaml train.max_steps=50",
    )
    parser.add_argument("--version", action="version", version=f"lora-llava {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and library warnings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (func, help_, setup) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=func.__doc__)
        setup(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went to `head` or a closed pager: stop quietly
        sys.stdout = open(os.devnull, "w")  # the interpreter flushes stdout at exit
        return 0
