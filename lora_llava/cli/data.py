"""``lora-llava data``: dataset tools (``data check``)."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ..llava.constants import LLAVA15_IMAGE_TOKENS

__all__ = ["cmd_data", "cmd_data_check", "data_args"]


def cmd_data(args) -> int:
    """Dataset tools; ``lora-llava data check --help`` for the one there is."""
    raise UsageError("data needs a subcommand: check")


def cmd_data_check(args) -> int:
    """Check every record of LLaVA JSON / JSONL data the way training reads it, and list every problem.

    Checked: the schema (conversations alternating human/gpt, non-empty string values), the images (under the
    image folder, present, decodable), '<image>' tags against images, and token lengths with the training
    tokenization (template, tokenizer, image tokens, max_length), so truncated and dropped counts are training's.
    Exit code 0 when every record is usable, 1 when any is bad (all are listed), 2 on a bad command.
    """
    from ..data.check import check_data

    report = check_data(args.data, args.image_folder, template=args.template, tokenizer=args.tokenizer,
                        max_length=args.max_length, num_image_tokens=args.image_tokens, dump=args.dump,
                        decode_images=not args.no_images_decode, workers=args.workers, progress=None)
    print(report.format())
    return 0 if report.ok else 1


def data_args(p: argparse.ArgumentParser) -> None:
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
    c.add_argument("--image-tokens", type=int, default=LLAVA15_IMAGE_TOKENS, metavar="N",
                   help="tokens per image (default 576: CLIP ViT-L/14 at 336 px)")
    c.add_argument("--dump", metavar="FILE.jsonl",
                   help="write {id, input_ids, labels} of every record that would train, as training sees it")
    c.add_argument("--no-images-decode", action="store_true",
                   help="only check that images exist (fast); by default each one is decoded")
    c.add_argument("--workers", type=int, default=1, metavar="N", help="processes decoding images (default 1)")
