"""The teacher's messages: a system message, few-shot pairs as user / assistant turns, then the image's context.

Prompts live in files, one folder per kind (``prompts/README.md``); the package ships its own and ``--prompts DIR``
replaces them. Contexts follow the LLaVA paper: captions one a line; for detailed description and complex reasoning
also one line per object, ``label: [x1, y1, x2, y2]`` (fractions with 3 decimals).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..errors import UsageError
from .annotations import Annotation

__all__ = ["DETAIL_INSTRUCTIONS", "KINDS", "PROMPTS_DIR", "Prompts", "context_of", "load_prompts", "messages_for"]

KINDS = ("conversation", "detail", "reasoning")
"""Conversation (captions only), detailed description and complex reasoning (captions + boxes)."""

PROMPTS_DIR = Path(__file__).with_name("prompts")

DETAIL_INSTRUCTIONS = (
    "Describe the following image in detail",
    "Provide a detailed description of the given image",
    "Give an elaborate explanation of the image you see",
    "Share a comprehensive rundown of the presented image",
    "Offer a thorough analysis of the image",
    "Explain the various aspects of the image before you",
    "Clarify the contents of the displayed image with great detail",
    "Characterize the image using a well-detailed description",
    "Break down the elements of the image in a detailed manner",
    "Walk through the important details of the image",
    "Portray the image with a rich, descriptive narrative",
    "Narrate the contents of the image with precision",
    "Analyze the image in a comprehensive and detailed manner",
    "Illustrate the image through a descriptive explanation",
    "Examine the image closely and share its details",
    "Write an exhaustive depiction of the given image",
)
"""The 16 detailed-description instructions of LLaVA; a description is paired with one drawn at random."""


@dataclasses.dataclass
class Prompts:
    system: str
    examples: list[tuple[str, str]]
    """(context, output) few-shot pairs."""


def load_prompts(folder: str | Path | None, kinds: tuple[str, ...] = KINDS) -> dict[str, Prompts]:
    """The prompts of each kind from ``folder/<kind>/`` (the shipped ones when ``folder`` is None)."""
    root = Path(folder) if folder is not None else PROMPTS_DIR
    out = {}
    for kind in kinds:
        d = root / kind
        system = d / "system.txt"
        if not system.is_file():
            raise UsageError(f"--prompts {root}: {system} is missing (see {PROMPTS_DIR / 'README.md'})")
        examples = []
        for ctx in sorted(d.glob("*_context.txt")):
            output = ctx.with_name(ctx.name.replace("_context.txt", "_output.txt"))
            if not output.is_file():
                raise UsageError(f"--prompts {root}: {ctx} has no {output.name} beside it")
            examples.append((ctx.read_text(encoding="utf-8").strip(), output.read_text(encoding="utf-8").strip()))
        orphans = [o.name for o in d.glob("*_output.txt")
                   if not o.with_name(o.name.replace("_output.txt", "_context.txt")).is_file()]
        if orphans:
            raise UsageError(f"--prompts {root}: {d}/{orphans[0]} has no _context.txt beside it")
        text = system.read_text(encoding="utf-8").strip()
        if not text:
            raise UsageError(f"--prompts {root}: {system} is empty")
        out[kind] = Prompts(text, examples)
    return out


def context_of(annotation: Annotation, kind: str) -> str:
    """What the teacher sees of one image for ``kind``."""
    lines = [re.sub(r"\s+", " ", c).strip() for c in annotation.captions]
    if kind != "conversation":
        lines += [f"{b.label}: [{', '.join(f'{v:.3f}' for v in b.bbox)}]" for b in annotation.boxes]
    return "\n".join(lines)


def messages_for(prompts: Prompts, context: str, system_in_user: bool = False) -> list[dict[str, str]]:
    """OpenAI chat messages: system, few-shot user / assistant turns, the image's context.

    ``system_in_user``: no system message; its text opens the first user turn instead (for endpoints and chat
    templates that refuse the system role, such as ``lora-llava serve``).
    """
    messages = [{"role": "system", "content": prompts.system}]
    for example, output in prompts.examples:
        messages += [{"role": "user", "content": example}, {"role": "assistant", "content": output}]
    messages.append({"role": "user", "content": context})
    if system_in_user:
        first = messages[1]["content"]
        messages = [{"role": "user", "content": f"{prompts.system}\n\n{first}"}, *messages[2:]]
    return messages
