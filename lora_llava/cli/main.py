"""The ``lora-llava`` command: a table of subcommands, each a thin call into the library.

Exit codes are decided here, once: 0 success; 1 the work failed on its input (a bad record, image, model or run
folder); 2 the command, recipe or launch is wrong (see :mod:`lora_llava.errors`); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

from .. import __version__
from ..errors import LoraLlavaError
from .data import cmd_data, data_args
from .eval import cmd_eval, eval_args
from .infer import chat_args, cmd_chat, cmd_generate, generate_args
from .run import cmd_merge, cmd_report, merge_args, report_args
from .serve import cmd_serve, serve_args
from .train import cmd_plan, cmd_sft, cmd_validate, plan_args, sft_args, validate_args

__all__ = ["COMMANDS", "build_parser", "main"]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("lora_llava").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # Library chatter that says nothing a lora-llava user can act on.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        warnings.filterwarnings("ignore", module=r"(torch|transformers|peft|trl|bitsandbytes|accelerate)(\..*)?")
        # bitsandbytes logs "pip install kernels" on the CPU when an optional kernel package is missing: it reads
        # like an instruction and is not the user's business (the CPU path works without it).
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None]]] = {
    "sft": (cmd_sft, "train a recipe (stage 1 or stage 2)", sft_args),
    "data": (cmd_data, "dataset tools: 'data check' validates records, 'data generate' makes instruction data "
                     "with a teacher LLM, 'data mix' builds a LLaVA-1.5-style mixture", data_args),
    "plan": (cmd_plan, "estimate peak GPU memory of a recipe and whether it fits", plan_args),
    "report": (cmd_report, "summarise a run folder (steps, losses, tokens, throughput) and redraw loss.png",
               report_args),
    "chat": (cmd_chat, "chat about an image with a run or checkpoint, answers streamed", chat_args),
    "generate": (cmd_generate, "answer a LLaVA eval question file in batches (greedy)", generate_args),
    "eval": (cmd_eval, "benchmarks: 'eval run' answers and scores, 'eval score' scores an answer file, 'eval compare'",
             eval_args),
    "serve": (cmd_serve, "serve a run or export: OpenAI-compatible API and a chat page", serve_args),
    "merge": (cmd_merge, "merge a run's LoRA adapter and projector into a model transformers / vLLM load", merge_args),
    "validate": (cmd_validate, "check a recipe and print it resolved; loads no weights", validate_args),
}
"""Subcommand -> (function, one-line help, argument setup)."""


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
    except LoraLlavaError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        # On a line of its own: a progress bar may hold the current one.
        print(f"\ninterrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went to `head` or a closed pager: stop quietly
        sys.stdout = open(os.devnull, "w")  # the interpreter flushes stdout at exit
        return 0
