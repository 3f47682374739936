"""``lora-llava data``: dataset tools (``data check``, ``data generate``, ``data mix``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import DataError, UsageError
from ..llava.constants import LLAVA15_IMAGE_TOKENS
from .common import positive, positive_int

__all__ = ["cmd_data", "cmd_data_check", "cmd_data_generate", "cmd_data_make_pretrain", "cmd_data_mix", "data_args"]


def cmd_data(args) -> int:
    """Dataset tools; ``lora-llava data SUBCOMMAND --help`` for each."""
    raise UsageError("data needs a subcommand: check, generate, mix or make-pretrain")


def cmd_data_generate(args) -> int:
    """Make LLaVA-format instruction data with a text-only teacher (any OpenAI-compatible chat endpoint) from
    annotated images: conversations, detailed descriptions and complex-reasoning Q&A, from captions (+ object boxes).

    Records are appended to OUT as they arrive; a rerun skips every record already in OUT (or rejected before), so an
    interrupted run is resumed by running the same command again. Replies that cannot be parsed go to the rejects
    file (OUT.rejects.jsonl) with the reason. The API key is read from the environment variable named by
    --api-key-env and never printed. Exit 0 when every request ended in a record or a reject, 1 when some failed.
    """
    from ..datagen.annotations import read_annotations
    from ..datagen.generate import generate, make_jobs
    from ..datagen.prompts import KINDS, load_prompts
    from ..datagen.teacher import Teacher, chat_url

    if not args.out.endswith(".jsonl"):
        raise UsageError(f"--out {args.out}: records are written one a line; name the file *.jsonl")
    chat_url(args.teacher_url)  # a URL that is not http(s) is a usage error before anything is read
    kinds = KINDS if args.kind == "all" else (args.kind,)
    folder = Path(args.image_folder)
    if not folder.is_dir():
        raise UsageError(f"--image-folder {folder}: not a folder")
    key_env = args.api_key_env or "OPENAI_API_KEY"
    api_key = os.environ.get(key_env)
    if args.api_key_env and not api_key:
        raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    prompts = load_prompts(args.prompts, kinds)
    annotations = read_annotations(args.annotations)
    if args.limit:
        annotations = annotations[:args.limit]
    missing = [a.image for a in annotations if not (folder / a.image).is_file()]
    if missing:
        raise DataError(f"{len(missing)} annotated image(s) not found under --image-folder {folder}: "
                        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    teacher = Teacher(args.teacher_url, args.teacher_model, api_key=api_key, temperature=args.temperature,
                      max_tokens=args.max_tokens, timeout=args.timeout, retries=args.retries, backoff=args.backoff)
    summary = generate(make_jobs(annotations, kinds), prompts, teacher, args.out, rejects=args.rejects,
                       concurrency=args.concurrency, seed=args.seed, retry_rejected=args.retry_rejected,
                       progress=not args.no_progress, system_in_user=args.system_in_user)
    print(summary.format())
    print(f"output      {args.out}")
    return 1 if summary.failed else 0


def cmd_data_mix(args) -> int:
    """Build a LLaVA-1.5-style mixture from a YAML spec: LLaVA JSON / JSONL files and VQA-style sets (VQAv2, GQA,
    OK-VQA, OCR-VQA, TextCaps, or a generic image/question/answer JSONL or CSV) converted with their response-format
    prompt, the QA pairs of one image merged into one conversation, sampled per source (ratio or count), deduplicated
    by (image, question), deterministic by seed. Writes one LLaVA JSON list and prints where each record came from.
    """
    from ..datagen.mix import build_mix, load_mix_spec, write_mix

    spec = load_mix_spec(args.spec)
    if args.seed is not None:
        spec.seed = args.seed
    records, table = build_mix(spec)
    write_mix(records, args.out)
    print(table.format())
    print(f"wrote {len(records)} records to {args.out}")
    return 0


def cmd_data_make_pretrain(args) -> int:
    """Turn image-caption pairs (JSON list, JSONL or CSV with image and caption fields) into stage-1 conversations,
    as LLaVA built CC3M-595K / LCS-558K: a random brief-description instruction (one of 11) with the image before or
    after it, the caption as the answer. Deterministic for a --seed. Bad records are named (file, line, field).
    """
    from ..datagen.pretrain import make_pretrain

    summary = make_pretrain(args.captions, args.out, seed=args.seed)
    print(summary.format())
    print(f"wrote {summary.records} records to {args.out}")
    return 0


def cmd_data_check(args) -> int:
    """Check every record of LLaVA JSON / JSONL data the way training reads it, and list every problem.

    Checked: the schema (conversations alternating human/gpt, non-empty string values), the images (under the
    image folder, present, decodable), '<image>' tags against images, and token lengths with the training
    tokenization (template, tokenizer, image tokens, max_length), so truncated and dropped counts are training's.
    For an AnyRes model (LLaVA-NeXT / LLaVA-1.5-HD: --recipe, --model or --grid-pinpoints) each image counts its own
    tokens, and the report gives their distribution per sample and names the samples that no longer fit --max-length.
    --recipe takes the model's grid (capped by data.max_tiles), data.max_length and the template from a recipe.
    Exit code 0 when every record is usable, 1 when any is bad (all are listed), 2 on a bad command.
    """
    from ..data.check import check_data

    grid, template, max_length = _from_recipe(args) if args.recipe else (_grid(args), None, None)
    report = check_data(args.data, args.image_folder, template=args.template or template or "vicuna_v1",
                        tokenizer=args.tokenizer,
                        max_length=args.max_length if args.max_length is not None else max_length or 2048,
                        num_image_tokens=args.image_tokens, dump=args.dump,
                        decode_images=not args.no_images_decode, workers=args.workers, progress=None, grid=grid)
    print(report.format())
    return 0 if report.ok else 1


def _pinpoints(text: str, tile: int) -> list[list[int]]:
    """``default`` (LLaVA-1.5-HD's 1x2, 2x1, 2x2 grids of ``tile``), ``llava16`` (LLaVA-1.6's: + 1x3, 3x1) or
    ``HxW,HxW,...`` in pixels."""
    from ..llava.anyres import grid_pinpoints

    if text == "default":
        return grid_pinpoints(tile)
    if text == "llava16":
        return grid_pinpoints(tile, ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1)))
    pins = []
    for part in text.split(","):
        h, sep, w = part.strip().lower().partition("x")
        if not sep or not h.isdigit() or not w.isdigit() or int(h) % tile or int(w) % tile or not int(h) * int(w):
            raise UsageError(f"--grid-pinpoints: '{part}' is not HEIGHTxWIDTH in multiples of the {tile} px tile "
                             "(e.g. 336x672,672x336,672x672), nor 'default' or 'llava16'")
        pins.append([int(h), int(w)])
    return pins


def _from_recipe(args):
    """(grid, template, max_length) of ``--recipe``: its model's AnyRes grid (None for LLaVA-1.5) with
    ``data.max_tiles`` applied, its template, its ``data.max_length``. Reads config files only."""
    from ..config.recipe import load_recipe
    from ..errors import ModelError, RecipeError
    from ..llava.anyres import AnyresGrid, limit_tiles
    from ..llava.spec import ModelSpec

    if args.model or args.grid_pinpoints or args.max_tiles is not None:
        raise UsageError("--recipe gives the grid (and data.max_tiles): leave out --model, --grid-pinpoints and "
                         "--max-tiles")
    try:
        recipe = load_recipe(args.recipe, check_files=False)
        grid = ModelSpec.from_recipe(recipe).grid
    except (RecipeError, ModelError) as e:
        raise UsageError(f"--recipe {args.recipe}: {e}") from None
    if grid is not None and recipe.data.max_tiles is not None:
        try:
            pins = limit_tiles(grid.pinpoints, grid.tile, recipe.data.max_tiles)
        except ValueError as e:
            raise UsageError(f"--recipe {args.recipe}: data.max_tiles: {e}") from None
        grid = AnyresGrid(grid.tile, grid.patch, tuple(tuple(p) for p in pins), grid.strategy)
    return grid, recipe.template, recipe.data.max_length


def _grid(args):
    """The AnyRes grid of --model / --grid-pinpoints (capped by --max-tiles), None for a fixed count per image."""
    from ..errors import ModelError
    from ..llava.anyres import AnyresGrid, limit_tiles
    from ..llava.spec import read_config_dict

    if args.model and args.grid_pinpoints:
        raise UsageError("give --model or --grid-pinpoints, not both")
    grid = None
    if args.model:
        try:
            grid = AnyresGrid.from_config(read_config_dict(args.model, "--model"))
        except ModelError as e:
            raise UsageError(str(e)) from None
        if grid is None:
            raise UsageError(f"--model {args.model}: its config has no image_grid_pinpoints (not an AnyRes model); "
                             "leave it out for LLaVA-1.5, whose images take --image-tokens each")
    elif args.grid_pinpoints:
        if args.tile_size % args.patch_size:
            raise UsageError(f"--tile-size {args.tile_size} is not a multiple of --patch-size {args.patch_size}")
        grid = AnyresGrid(args.tile_size, args.patch_size,
                          tuple((h, w) for h, w in _pinpoints(args.grid_pinpoints, args.tile_size)))
    if args.max_tiles is not None:
        if grid is None:
            raise UsageError("--max-tiles needs an AnyRes grid (--model or --grid-pinpoints)")
        try:
            grid = AnyresGrid(grid.tile, grid.patch, tuple(tuple(p) for p in limit_tiles(grid.pinpoints, grid.tile,
                                                                                       args.max_tiles)), grid.strategy)
        except ValueError as e:
            raise UsageError(f"--max-tiles: {e}") from None
    return grid


def data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    c = sub.add_parser("check", help="check every record of a dataset; exit 1 if any is bad",
                       description=cmd_data_check.__doc__)
    c.set_defaults(func=cmd_data_check)
    c.add_argument("data", nargs="+", metavar="DATA", help="LLaVA JSON (a list) or JSONL files")
    c.add_argument("--image-folder", required=True, metavar="DIR", help="folder the records' image paths are under")
    # No choices=: listing the templates would import the data package (and torch) for every `lora-llava --help`.
    c.add_argument("--template",
                   help="conversation template: vicuna_v1 (default), plain (stage-1 caption data), llava_v0")
    c.add_argument("--tokenizer", metavar="PATH",
                   help="local tokenizer folder (default: the shipped Vicuna-v1.5 tokenizer); <image> and <pad> "
                        "are added as llava-hf has them")
    c.add_argument("--max-length", type=int, metavar="N",
                   help="data.max_length of training (default 2048, or the --recipe's)")
    c.add_argument("--image-tokens", type=int, default=LLAVA15_IMAGE_TOKENS, metavar="N",
                   help="tokens per image (default 576: CLIP ViT-L/14 at 336 px); AnyRes models count per image")
    c.add_argument("--recipe", metavar="RECIPE.yaml",
                   help="count as this recipe's model does (AnyRes grid, data.max_tiles) with its data.max_length and "
                        "template; reads config files only")
    c.add_argument("--model", metavar="DIR",
                   help="an AnyRes (LLaVA-NeXT) checkpoint folder: its config's grid counts each image's tokens")
    c.add_argument("--grid-pinpoints", metavar="GRID",
                   help="count image tokens as an AnyRes model with these grid resolutions does: 'default' "
                        "(LLaVA-1.5-HD: 336x672,672x336,672x672), 'llava16' (+ 336x1008,1008x336) or HxW,HxW,...")
    c.add_argument("--tile-size", type=positive_int, default=336, metavar="PX",
                   help="with --grid-pinpoints: the vision tower's image size (default 336)")
    c.add_argument("--patch-size", type=positive_int, default=14, metavar="PX",
                   help="with --grid-pinpoints: the vision tower's patch size (default 14)")
    c.add_argument("--max-tiles", type=positive_int, metavar="N",
                   help="data.max_tiles of training: only grid resolutions of at most N tiles")
    c.add_argument("--dump", metavar="FILE.jsonl",
                   help="write {id, input_ids, labels} of every record that would train, as training sees it")
    c.add_argument("--no-images-decode", action="store_true",
                   help="only check that images exist (fast); by default each one is decoded")
    c.add_argument("--workers", type=int, default=1, metavar="N", help="processes decoding images (default 1)")

    g = sub.add_parser("generate", help="make instruction data with a teacher LLM (OpenAI-compatible endpoint)",
                       description=cmd_data_generate.__doc__)
    g.set_defaults(func=cmd_data_generate)
    g.add_argument("annotations", nargs="+", metavar="ANNOTATIONS",
                   help="COCO captions_*.json (+ instances_*.json for boxes), or JSONL "
                        '{"image", "captions": [...], "boxes": [{"label", "bbox": [x1, y1, x2, y2]}]} (0-1)')
    g.add_argument("--image-folder", required=True, metavar="DIR", help="folder the annotated image paths are under")
    g.add_argument("--kind", default="all", choices=["conversation", "detail", "reasoning", "all"],
                   help="what to generate (default all three)")
    g.add_argument("--out", required=True, metavar="OUT.jsonl", help="LLaVA records, one a line (appended to)")
    g.add_argument("--rejects", metavar="FILE.jsonl", help="unparseable replies (default OUT.rejects.jsonl)")
    g.add_argument("--teacher-url", required=True, metavar="URL",
                   help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 or https://api.openai.com/v1")
    g.add_argument("--teacher-model", required=True, metavar="NAME", help="model name sent to the endpoint")
    g.add_argument("--api-key-env", metavar="VAR",
                   help="environment variable holding the API key (default OPENAI_API_KEY if set; none for local "
                        "servers)")
    g.add_argument("--prompts", metavar="DIR", help="your own prompt folder (copy lora_llava/datagen/prompts)")
    g.add_argument("--concurrency", type=positive_int, default=4, metavar="N", help="requests in flight (default 4)")
    g.add_argument("--limit", type=positive_int, metavar="N", help="only the first N images")
    g.add_argument("--seed", type=int, default=0, help="seed of the random choices (image position, instruction)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--max-tokens", type=positive_int, default=1024, metavar="N", help="per reply (default 1024)")
    g.add_argument("--timeout", type=positive, default=120.0, metavar="S", help="per request (default 120 s)")
    g.add_argument("--retries", type=int, default=6, metavar="N",
                   help="retries of a request on 429 / 5xx / timeouts (default 6)")
    g.add_argument("--backoff", type=positive, default=1.0, metavar="S",
                   help="first retry delay, doubled each time (default 1 s; a Retry-After header wins)")
    g.add_argument("--retry-rejected", action="store_true", help="ask again for records rejected by an earlier run")
    g.add_argument("--system-in-user", action="store_true",
                   help="send no system message: put its text at the start of the first user turn (for endpoints "
                        "or chat templates that refuse the system role, e.g. lora-llava serve)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    mp = sub.add_parser("make-pretrain", help="image-caption pairs -> stage-1 (projector alignment) conversations",
                        description=cmd_data_make_pretrain.__doc__)
    mp.set_defaults(func=cmd_data_make_pretrain)
    mp.add_argument("captions", metavar="CAPTIONS", help="a JSON list, JSONL or CSV of {image, caption} records")
    mp.add_argument("--out", required=True, metavar="CHAT.json", help="the stage-1 data (a LLaVA JSON list)")
    mp.add_argument("--seed", type=int, default=0, help="seed of the instruction and placement choices (default 0)")

    m = sub.add_parser("mix", help="build a LLaVA-1.5-style data mixture from a YAML spec",
                       description=cmd_data_mix.__doc__)
    m.set_defaults(func=cmd_data_mix)
    m.add_argument("spec", metavar="SPEC.yaml", help="the sources, their formats and ratios / counts")
    m.add_argument("--out", required=True, metavar="MIX.json", help="the mixture (a LLaVA JSON list)")
    m.add_argument("--seed", type=int, help="override the spec's seed")
