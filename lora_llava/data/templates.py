"""Conversation templates of LLaVA: the exact prompt strings, and which parts of them are supervised.

A template renders a conversation into *segments*: ``(text, supervised)`` pairs whose concatenation is the exact
prompt string of the LLaVA reference. The supervised segments are the assistant answers with the separator that
closes them (``</s>`` for ``vicuna_v1``, ``\\n`` for ``plain``, ``###`` for ``llava_v0``): exactly what the reference's
``preprocess_*`` functions leave unmasked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..llava.constants import IMAGE_TOKEN as IMAGE_TAG

Turn = tuple[str, str]
"""``(role, text)`` with role ``human`` or ``gpt``."""
Segment = tuple[str, bool]
"""``(text, supervised)``."""

__all__ = ["TEMPLATES", "Template", "get_template", "register_template"]


@dataclasses.dataclass(frozen=True)
class Template:
    """A conversation format.

    ``render(turns, add_generation_prompt)`` returns the segments. With ``add_generation_prompt`` the conversation
    must end on a human turn and the result ends with the assistant header, ready for generation.
    """

    name: str
    render_fn: Callable[[Template, list[Turn], bool], list[Segment]]
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    stop: str = "</s>"
    """Text that ends an answer at generation time."""

    def render(self, turns: list[Turn], add_generation_prompt: bool = False) -> list[Segment]:
        """Segments of the prompt; see the module docstring."""
        return self.render_fn(self, turns, add_generation_prompt)

    def prompt(self, turns: list[Turn]) -> str:
        """The prompt string up to the assistant header of the last (human) turn: what generation starts from."""
        return "".join(text for text, _ in self.render(turns, add_generation_prompt=True))


def _pairs(turns: list[Turn], add_generation_prompt: bool) -> list[tuple[str, str | None]]:
    """(question, answer) pairs; the last answer is None when a generation prompt is wanted."""
    out: list[tuple[str, str | None]] = []
    for i in range(0, len(turns), 2):
        q = turns[i][1]
        a = turns[i + 1][1] if i + 1 < len(turns) else None
        out.append((q, a))
    if add_generation_prompt:
        if out and out[-1][1] is not None:
            raise ValueError("a generation prompt needs a conversation that ends on a human turn")
    elif out and out[-1][1] is None:
        raise ValueError("the conversation ends on a human turn: the last question has no answer")
    return out


def _render_vicuna_v1(t: Template, turns: list[Turn], add_generation_prompt: bool) -> list[Segment]:
    # Reference (sep_style TWO): system + " " + "USER: q ASSISTANT: a</s>" per round.
    user, assistant = t.roles
    segments: list[Segment] = []
    head = t.system + " "
    for q, a in _pairs(turns, add_generation_prompt):
        if a is None:
            segments.append((head + f"{user}: {q} {assistant}:", False))
            break
        # The space after "ASSISTANT:" belongs to the answer: generation starts right after the colon, so the model
        # must learn to emit it (a lone "▁" token before digits, say), as the reference's masking supervises it.
        segments.append((head + f"{user}: {q} {assistant}:", False))
        segments.append((" " + a + "</s>", True))
        head = ""
    return segments


def _render_plain(t: Template, turns: list[Turn], add_generation_prompt: bool) -> list[Segment]:
    # Reference (preprocess_plain): the question is replaced by the bare image tag; caption + "\n" is supervised.
    pairs = _pairs(turns, add_generation_prompt)
    if len(pairs) != 1:
        raise ValueError(f"the plain template takes exactly one question and one answer, got {len(pairs)} rounds")
    q, a = pairs[0]
    prompt = IMAGE_TAG * max(1, q.count(IMAGE_TAG))
    if a is None:
        return [(prompt, False)]
    return [(prompt, False), (a + "\n", True)]


def _render_llava_v0(t: Template, turns: list[Turn], add_generation_prompt: bool) -> list[Segment]:
    # Reference (train.py's _add_speaker_and_signal for v0): system + "\n\n", then "### Human: q\n" and
    # "### Assistant: a\n" per turn, and a final "### ". The "###" that follows an answer is the stop signal, so it is
    # supervised with the answer. (The reference also leaves the "### Assistant: " headers unmasked and counts
    # lengths with a BOS per piece; we supervise only what the model must produce: each answer and its stop signal.)
    human, assistant = t.roles
    segments: list[Segment] = []
    head = t.system + "\n\n### "
    for q, a in _pairs(turns, add_generation_prompt):
        segments.append((head + f"{human}: {q}\n### {assistant}:", False))
        if a is None:
            break
        segments.append((" " + a + "\n###", True))
        head = " "
    if not add_generation_prompt:
        segments.append((" ", False))
    return segments


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

TEMPLATES: dict[str, Template] = {
    "vicuna_v1": Template("vicuna_v1", _render_vicuna_v1, _VICUNA_SYSTEM, ("USER", "ASSISTANT"), "</s>"),
    "plain": Template("plain", _render_plain, "", ("", ""), "\n"),
    "llava_v0": Template("llava_v0", _render_llava_v0, _V0_SYSTEM, ("Human", "Assistant"), "###"),
}


def register_template(template: Template, overwrite: bool = False) -> None:
    """Make a custom template available by name (``data.template: NAME`` in a recipe run from Python)."""
    if template.name in TEMPLATES and not overwrite:
        raise ValueError(f"template '{template.name}' exists; pass overwrite=True to replace it")
    TEMPLATES[template.name] = template


def get_template(name: str) -> Template:
    """The template called ``name``; the error lists the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template '{name}'; known: {', '.join(sorted(TEMPLATES))}") from None
