"""Reading the teacher's replies: ``Question:`` / ``===`` / ``Answer:`` pairs and plain descriptions.

The reference never released its parser. Real models drift from the asked-for format in a handful of ways, all read
here: the text on the label's line (``Question: What ...``), ``Q:`` / ``A:``, markdown (``**Question:**``, ``###
Answer``), numbering (``1. Question:``, ``Question 2:``), ``---`` or no separator instead of ``===``, a preamble
("Here is the conversation:"), code fences, CRLF line ends. What still cannot be read raises :class:`Reject` with a
short reason (counted in the summary) and a message.
"""

from __future__ import annotations

import re

__all__ = ["Reject", "parse_description", "parse_pairs"]


class Reject(Exception):  # noqa: N818 - a reply that is rejected, not a program error
    """A reply that cannot be used: ``reason`` is a short key (for the summary), the message says what was wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_LABEL = re.compile(
    r"^[ \t>#*_\-]*(?:\d+[.)][ \t]*)?[*_]*"  # markdown, numbering
    r"(?P<label>question|answer|q|a)(?:[ \t]*\d+)?[ \t]*[*_]*[ \t]*[:：][*_]*[ \t]*",
    re.IGNORECASE | re.MULTILINE)
_SEPARATOR = re.compile(r"^[ \t]*(?:={3,}|-{3,}|\*{3,}|_{3,})[ \t]*$", re.MULTILINE)
_FENCE = re.compile(r"^[ \t]*```[\w-]*[ \t]*$", re.MULTILINE)
_REFUSAL = re.compile(r"^\W*(?:i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|as an ai (?:language )?model)",
                      re.IGNORECASE)
_COORDINATES = re.compile(r"\[\s*[01]?\.\d+\s*,\s*[01]?\.\d+\s*,")
_MENTIONS_INPUT = re.compile(r"\b(?:bounding box(?:es)?|the (?:given |provided )?(?:captions|coordinates))\b",
                             re.IGNORECASE)


def _clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]*={3,}[ \t]*", "\n===\n", text)  # "Question: ... === Answer: ..." on one line
    return _FENCE.sub("", text).strip()


def _field(text: str) -> str:
    """The text of one question or answer: separators removed, markdown emphasis around it dropped."""
    text = _SEPARATOR.sub("", text).strip()
    text = re.sub(r"^\*\*(.*)\*\*$", r"\1", text, flags=re.DOTALL).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


def _check_common(text: str, finish_reason: str | None) -> None:
    if not text:
        raise Reject("empty", "the reply is empty")
    if finish_reason == "length":
        raise Reject("truncated", "the reply was cut at the token limit (finish_reason 'length')")
    if _REFUSAL.match(text):
        raise Reject("refusal", f"the teacher refused: {text[:80]!r}")
    if "<image>" in text:
        raise Reject("image_tag", "the reply contains '<image>'")
    special = next((t for t in ("<pad>", "</s>", "<s>", "<unk>") if t in text), None)
    if special:  # training would read it as the tokenizer's special token, not as text
        raise Reject("special_token", f"the reply contains {special!r}")


def parse_pairs(reply: str, expect_one: bool = False, finish_reason: str | None = None) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a conversation or complex-reasoning reply, in order.

    ``expect_one``: the reply must hold exactly one pair (complex reasoning). Raises :class:`Reject`.
    """
    text = _clean(reply)
    _check_common(text, finish_reason)
    marks = list(_LABEL.finditer(text))
    if not marks:
        raise Reject("no_labels", "no 'Question:' / 'Answer:' labels in the reply")
    pairs: list[tuple[str, str]] = []
    question: str | None = None
    for i, m in enumerate(marks):
        kind = m.group("label").lower()[0]
        body = _field(text[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(text)])
        if kind == "q":
            if question is not None:
                raise Reject("unpaired", f"question {len(pairs) + 1} has no answer before the next question")
            if not body:
                raise Reject("empty_field", f"question {len(pairs) + 1} is empty")
            question = body
        else:
            if question is None:
                raise Reject("unpaired", f"answer {len(pairs) + 1} has no question before it")
            if not body:
                raise Reject("empty_field", f"the answer to question {len(pairs) + 1} is empty")
            pairs.append((question, body))
            question = None
    if question is not None:
        raise Reject("unpaired", f"question {len(pairs) + 1} has no answer (the reply ends after it)")
    if expect_one and len(pairs) != 1:
        raise Reject("pair_count", f"expected one question and answer, got {len(pairs)}")
    return pairs


def parse_description(reply: str, finish_reason: str | None = None) -> str:
    """The description of a detailed-description reply (a leading ``Description:`` label is dropped)."""
    text = _clean(reply)
    _check_common(text, finish_reason)
    text = re.sub(r"^[*_#\s]*(?:detailed )?description[*_]*\s*[:：][*_]*\s*", "", text, flags=re.IGNORECASE).strip()
    if not text:
        raise Reject("empty", "the reply has a label and no description")
    if _LABEL.search(text) and re.search(r"^\W*(?:q|question)\W", text, re.IGNORECASE | re.MULTILINE):
        raise Reject("format", "the reply is question/answer pairs, not a description")
    if _COORDINATES.search(text) or _MENTIONS_INPUT.search(text):
        raise Reject("mentions_input", "the description mentions box coordinates or the captions it was given")
    return text
