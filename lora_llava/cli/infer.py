"""``lora-llava chat`` and ``lora-llava generate``: talk to a run folder or an export, or answer a question file."""

from __future__ import annotations

import argparse
import sys

from ..errors import DataError, ModelError, UsageError
from .common import non_negative, positive_int

__all__ = ["chat_args", "check_template", "cmd_chat", "cmd_generate", "generate_args", "model_args"]


def model_args(p: argparse.ArgumentParser) -> None:
    """PATH and how to load it: shared by chat and generate."""
    p.add_argument("path", metavar="PATH",
                   help="a lora-llava run folder (recipe.yaml, projector, adapter) or a llava-hf / original LLaVA "
                        "checkpoint folder (e.g. a 'lora-llava merge' export)")
    p.add_argument("--template", metavar="NAME",
                   help="conversation template (default: the run's; for a checkpoint the one its lora_llava.json "
                        "names, else vicuna_v1)")
    p.add_argument("--bits", type=int, choices=(4, 8, 16),
                   help="quantize the language model on load (default: as trained for a run folder, 16 for a "
                        "checkpoint)")
    p.add_argument("--device", metavar="DEVICE",
                   help="where the model runs, e.g. cpu or cuda:1 (default: the GPU when there is one)")


def check_template(name: str | None) -> None:
    if name is None:
        return
    from ..data import get_template

    try:
        get_template(name)
    except ValueError as e:
        raise UsageError(f"--template: {e}") from None


def cmd_chat(args) -> int:
    """Chat about an image with a trained run or a LLaVA checkpoint; answers stream to stdout token by token.

    The conversation is tokenized exactly as training tokenizes it (the run's template; the image goes with the
    first question). Without --prompt, questions are read one per line from stdin until end of input or 'exit'
    ('reset' starts the conversation over); with --prompt, one answer is printed. Greedy unless --temperature > 0.
    Exit code 0 on success, 1 when the model, the image or a question cannot be used, 2 on a bad command.
    """
    check_template(args.template)
    from ..infer.chat import ChatSession, open_image
    from ..infer.load import load_for_inference

    if args.image is not None:
        open_image(args.image)  # a missing or broken image fails before any weights load
    loaded = load_for_inference(args.path, args.device, bits=args.bits)
    session = ChatSession(loaded.model, loaded.processor, args.template or loaded.template, image=args.image,
                          image_aspect_ratio=loaded.image_aspect_ratio, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def ask(question: str) -> bool:
        try:
            session.ask(question, stream=write)
        except ModelError as e:
            print(f"error: {e}", file=sys.stderr)
            return False
        write("\n")
        return True

    if args.prompt is not None:
        return 0 if ask(args.prompt) else 1
    interactive = sys.stdin.isatty()
    if interactive:
        about = f"about '{args.image}'" if args.image else "without an image"
        print(f"chatting with '{args.path}' {about} (template {session.template.name}); 'reset' starts over, "
              "'exit' or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("USER: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        question = line.strip()
        if not question:
            continue
        if question.lower() in ("exit", "quit"):
            break
        if question.lower() == "reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if interactive:
            print("ASSISTANT: ", end="", file=sys.stderr, flush=True)
        ask(question)
    return 0


def chat_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--image", metavar="IMG", help="the image to talk about (any image file); omit for text-only chat")
    p.add_argument("--prompt", metavar="TEXT", help="ask this one question, print the answer and exit")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, metavar="N",
                   help="longest answer in tokens (default 512)")
    p.add_argument("--temperature", type=non_negative, default=0.0, metavar="T",
                   help="sampling temperature; 0 (default) answers greedily")


def cmd_generate(args) -> int:
    """Answer a LLaVA evaluation question file in batches, greedily, and write LLaVA's answer file.

    Each line of the questions file is {"question_id", "image", "text"}: the image relative to --image-folder
    (which it cannot leave; optional), the text the question; '<image>\\n' is put in front of it when the record has
    an image and the text no tag, as LLaVA's model_vqa does. Each output line is {"question_id", "prompt", "text",
    "answer_id", "model_id"}, in the order of the questions; the file appears only when every answer is written.
    Exit code 0 on success, 1 on a bad question line (its number is named), image or model, 2 on a bad command.
    """
    check_template(args.template)
    import json
    import uuid
    from pathlib import Path

    from tqdm.auto import tqdm

    from ..files import write_atomic
    from ..infer.generate import generate_answers
    from ..infer.load import load_for_inference
    from ..infer.questions import read_questions

    if not Path(args.image_folder).is_dir():
        raise DataError(f"--image-folder: '{args.image_folder}' is not a folder")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out '{out}' is a folder; give the answers file's name (e.g. '{out / 'answers.jsonl'}')")
    model_id = args.model_id or Path(args.path).resolve().name
    questions = read_questions(args.questions, args.image_folder)
    loaded = load_for_inference(args.path, args.device, bits=args.bits)
    template = args.template or loaded.template
    text_only = [q["line"] for q in questions if q["image"] is None]
    if template == "plain" and text_only:
        raise DataError(f"{args.questions}, line {text_only[0]}: no image, but the plain template (a stage-1 run) only "
                        "captions images")

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f, tqdm(total=len(questions), desc="answering", unit="q",
                                                           dynamic_ncols=True) as bar:
            for start in range(0, len(questions), args.batch_size):
                chunk = questions[start:start + args.batch_size]
                answers = generate_answers(loaded.model, loaded.processor, [q["turns"] for q in chunk],
                                           [[q["image"]] if q["image"] is not None else [] for q in chunk],
                                           args.image_folder, template=template,
                                           image_aspect_ratio=loaded.image_aspect_ratio,
                                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
                for q, answer in zip(chunk, answers):
                    f.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": answer,
                                        "answer_id": uuid.uuid4().hex, "model_id": model_id}) + "\n")
                bar.update(len(chunk))

    try:
        write_atomic(out, write)
    except OSError as e:  # --out is a folder, the disk is full: nothing is left behind
        print(f"error: writing {out} failed ({e})", file=sys.stderr)
        return 1
    print(f"{len(questions)} answers written to {out} (model_id {model_id})")
    return 0


def generate_args(p: argparse.ArgumentParser) -> None:
    model_args(p)
    p.add_argument("--questions", required=True, metavar="Q.jsonl",
                   help="LLaVA question file: one {question_id, image, text} per line")
    p.add_argument("--image-folder", required=True, metavar="DIR", help="folder the questions' image paths are under")
    p.add_argument("--out", required=True, metavar="A.jsonl", help="answer file to write")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="questions per batch (default 8)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N",
                   help="longest answer in tokens (default 128)")
    p.add_argument("--model-id", metavar="ID", help="model_id written with each answer (default: PATH's folder name)")
